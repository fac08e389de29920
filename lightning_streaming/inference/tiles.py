"""Tile sizes for inference: without a graph a tile holds only the activations alive at
once, so it can be far larger than a training tile; the largest one within a memory
budget reads the fewest halo pixels."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from ..core import TileTooSmallError, estimate_inference_memory, tile_plan

__all__ = ["default_memory_budget", "estimate_inference_memory", "inference_tile_size"]

_GiB = 2**30


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """A quarter of the memory available on ``device`` now (CUDA: free device memory; CPU:
    the kernel's MemAvailable), between 256 MiB and 8 GiB."""
    device = torch.device(device or "cpu")
    available = None
    if device.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
        except OSError:
            available = None
        if available is None and hasattr(os, "sysconf"):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if not available:
        return 2 * _GiB
    return int(min(8 * _GiB, max(256 * 2**20, available // 4)))


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest ``t`` in ``[low, high]`` with ``fits(t)`` (``fits`` monotone, ``fits(low)``),
    to within about 1.5%: finer steps change nothing that matters."""
    if fits(high):
        return high
    while high - low > max(8, low // 64):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def inference_tile_size(
    module: nn.Module, input_shape: Sequence[int], memory_budget: int
) -> int | tuple[int, ...]:
    """The tile whose no-grad forward (:func:`estimate_inference_memory` of the plan's
    largest region) fits ``memory_budget`` bytes for an input of ``input_shape`` and reads
    the fewest pixels (the least halo): the largest square tile, or a strip spanning the
    image's width or height where that reads fewer (trunks with a large receptive field).

    Balanced plans use as few tiles as a tile size allows, so for each shape the largest
    tile that fits reads the fewest pixels; an image that fits whole gets one tile.

    Raises:
        TileTooSmallError: even the smallest usable tile does not fit.
    """
    spatial = [int(s) for s in input_shape[2:]]

    estimates: dict[tuple[int, ...], int] = {}  # many tile sizes share a plan's largest region

    def fits(tile: int | tuple[int, ...]) -> bool:
        region = tuple(tile_plan(module, input_shape, tile).largest_region)
        if region not in estimates:
            estimates[region] = estimate_inference_memory(module, (*input_shape[:2], *region))
        return estimates[region] <= memory_budget

    try:
        tile_plan(module, input_shape, 1)
        low = 1
    except TileTooSmallError as error:
        low = max(error.minimum_tile)
    if not fits(low):
        raise TileTooSmallError(
            f"a memory budget of {memory_budget / 2**20:.0f} MiB is too small for even the smallest usable tile "
            f"({low} px) of this trunk; raise memory_budget or give tile_size",
            (low,) * len(spatial),
        )
    square = _largest(fits, low, max(spatial))
    candidates: list[int | tuple[int, ...]] = [square]
    if len(spatial) == 2 and square < max(spatial):
        for axis in (0, 1):  # strips: whole along one axis, as long as fits along the other
            if spatial[1 - axis] > square and fits(_strip(spatial, axis, low)):
                size = _largest(lambda t: fits(_strip(spatial, axis, t)), low, square)
                candidates.append(_strip(spatial, axis, size))
    return min(candidates, key=lambda tile: tile_plan(module, input_shape, tile).pixels)


def _strip(spatial: Sequence[int], axis: int, size: int) -> tuple[int, int]:
    """A tile ``size`` long along ``axis`` and spanning the image along the other axis."""
    return (size, spatial[1]) if axis == 0 else (spatial[0], size)
