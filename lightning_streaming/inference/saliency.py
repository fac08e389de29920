"""Streamed saliency: the input gradient reduced per pixel and pooled as it is produced, so
a slide's full-size gradient never exists."""

from __future__ import annotations

import bisect
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core import RegionSource, input_gradients, tile_plan

__all__ = ["REDUCTIONS", "Reduction", "reduce_channels", "streamed_saliency"]

Reduction = Literal["max_abs", "l2"]

#: How a pixel's gradient over its channels becomes one value: ``(N, C, h, w) -> (N, h, w)``.
REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    # max |g| as max(max g, -min g): no full-size copy of the gradient
    "max_abs": lambda g: torch.maximum(g.amax(dim=1), g.amin(dim=1).neg_()),
    "l2": lambda g: torch.linalg.vector_norm(g, 2, dim=1),
}


def reduce_channels(gradient: Tensor, reduction: str) -> Tensor:
    """``gradient`` ``(N, C, *spatial)`` reduced over channels by ``reduction`` (see :data:`REDUCTIONS`)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"saliency reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction](gradient)


def _cells(segments: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Breakpoints of the elementary intervals that the segments' regions cut an axis into,
    and how many regions cover each interval."""
    points = sorted({s.start for s in segments} | {s.stop for s in segments})
    cover = [sum(s.start <= a and b <= s.stop for s in segments) for a, b in zip(points, points[1:])]
    return points, cover


def streamed_saliency(
    trunk: nn.Module,
    image: Tensor | RegionSource,
    tile_size: int | Sequence[int],
    grad_outputs: Any,
    sink: Callable[[int, int, np.ndarray], None],
    *,
    reduction: str = "max_abs",
    transform: Callable[[Tensor], Tensor] | None = None,
    tile_device: torch.device | str | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> int:
    """Reduce the input gradient of ``sum(grad_outputs * trunk(image))`` over channels, pixel
    by pixel, handing each finished block to ``sink(row, col, values)`` (``values``:
    float64 ``(N, h, w)``) as soon as no later tile touches it.

    The gradient arrives one tile at a time from :func:`~lightning_streaming.core.input_gradients`;
    tiles' regions overlap by the halo, and a pixel's gradient is the sum over the tiles that
    read it. The tile plan cuts the image into elementary cells (between consecutive region
    borders); a cell is summed while tiles still touch it and reduced once its last tile has
    passed. In raster order, what is held at once is one tile's gradient, the halo band
    below the current row of tiles and the halo to the right of the current tile: never
    the full-size gradient. Exact: each pixel's value is the reduction of its summed
    gradient, as for the conventional input gradient (up to summation order).

    Args:
        trunk: the streamed trunk (2 spatial dimensions).
        image: ``(N, C, H, W)``: a tensor or a lazy source (uint8 with ``transform``).
        tile_size: tile size of the backward passes (each keeps one tile's graph).
        grad_outputs: gradient of the score with respect to each trunk output.
        sink: receives ``(row, col, values)`` for each finished block; blocks partition
            the image.
        reduction: ``"max_abs"`` (largest absolute value over channels) or ``"l2"``.
        transform: per-pixel tile transform; the gradient is with respect to its output
            (the normalised pixels).
        tile_device: device of the tiles (default: the trunk's).
        on_tile: called with ``(tiles done, tiles in all)`` after each tile.

    Returns:
        The most gradient values held at once between tiles (summed cells waiting for
        later tiles), a check of the memory bound.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"saliency reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if len(image.shape) != 4:
        raise ValueError(f"saliency maps are for images (N, C, H, W), got shape {tuple(image.shape)}")
    plan = tile_plan(trunk, image.shape, tile_size)
    (ys, row_cover), (xs, col_cover) = _cells(plan.segments[0]), _cells(plan.segments[1])
    pending: dict[tuple[int, int], list[Any]] = {}  # cell -> [summed gradient, tiles still to come]
    total, held = len(plan), 0
    for done, (region, gradient) in enumerate(
        input_gradients(trunk, image, tile_size, grad_outputs, tile_device=tile_device, transform=transform), 1
    ):
        (r0, r1), (c0, c1) = ((s.start, s.stop) for s in region)
        first_row, last_row = bisect.bisect_left(ys, r0), bisect.bisect_left(ys, r1)
        first_col, last_col = bisect.bisect_left(xs, c0), bisect.bisect_left(xs, c1)
        borders = (ys[first_row], ys[min(last_row, len(ys) - 1)], xs[first_col], xs[min(last_col, len(xs) - 1)])
        if (r0, r1, c0, c1) != borders:
            raise RuntimeError(f"internal error: region {region} does not follow the tile plan's borders")
        for i in range(first_row, last_row):
            for j in range(first_col, last_col):
                block = gradient[:, :, ys[i] - r0 : ys[i + 1] - r0, xs[j] - c0 : xs[j + 1] - c0]
                cell = pending.get((i, j))
                if cell is None:
                    cover = row_cover[i] * col_cover[j]
                    # A cell that waits for other tiles is copied out, so it holds no tile's whole gradient.
                    cell = [block if cover == 1 else block.clone(), cover]
                else:
                    cell[0] = cell[0] + block
                cell[1] -= 1
                if cell[1] == 0:
                    pending.pop((i, j), None)
                    values = reduce_channels(cell[0], reduction).to("cpu", torch.float64).numpy()
                    sink(ys[i], xs[j], values)
                else:
                    pending[(i, j)] = cell
        del gradient
        held = max(held, sum(cell[0].numel() for cell in pending.values()))
        if on_tile is not None:
            on_tile(done, total)
    if pending:
        raise RuntimeError(f"internal error: {len(pending)} saliency cells were not finished")
    return held
