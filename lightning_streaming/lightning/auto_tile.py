"""The largest tile whose working set fits a per-tile memory budget, without running the trunk.

The strategies' ``tile_size="auto"`` uses the core's budget planner instead (the whole
step's memory: :func:`~lightning_streaming.stream_plan`); this is the simpler per-tile rule.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core import TileTooSmallError, estimate_tile_memory, parse_bytes, tile_plan

__all__ = ["auto_tile_size", "estimate_tile_memory", "parse_bytes"]


def auto_tile_size(
    module: nn.Module,
    input_shape: Sequence[int],
    memory_budget: int | str,
    *,
    input_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
    input_grad: bool = False,
) -> int:
    """The largest square tile (in input pixels) whose :func:`estimate_tile_memory` fits
    ``memory_budget`` for an input of ``input_shape`` ``(N, C, *spatial)``.

    Tiles are clamped to the image, so an image whose whole working set fits gets one
    tile. Raises :class:`~lightning_streaming.TileTooSmallError` when even the smallest
    usable tile does not fit.
    """
    budget = parse_bytes(memory_budget)
    batch, spatial = tuple(input_shape[:2]), tuple(int(s) for s in input_shape[2:])

    def cost(tile: int) -> int:
        region = tuple(min(tile, s) for s in spatial)
        return estimate_tile_memory(
            module, batch + region, input_dtype=input_dtype, activation_dtype=activation_dtype, input_grad=input_grad
        )

    try:
        tile_plan(module, input_shape, 1)
        smallest = 1
    except TileTooSmallError as error:
        smallest = max(error.minimum_tile)
    largest = max(spatial)
    if cost(largest) <= budget:
        return largest
    if cost(smallest) > budget:
        raise TileTooSmallError(
            f"memory_budget {budget / 2**20:.1f} MiB is too small: the smallest usable tile ({smallest} px) needs "
            f"about {cost(smallest) / 2**20:.1f} MiB for an input of shape {tuple(input_shape)}. Raise the budget, "
            "lower the batch size, or give an explicit tile_size",
            (smallest,) * len(spatial),
        )
    # The working set grows with the tile, so bisect for the largest tile that fits.
    good, bad = smallest, largest
    while bad - good > 1:
        mid = (good + bad) // 2
        if cost(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good
