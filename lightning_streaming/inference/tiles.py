"""Tile sizes for inference: without a graph a tile holds only the activations alive at
once, so it can be far larger than a training tile; the largest one within a memory
budget reads the fewest halo pixels."""

from __future__ import annotations

import os
import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core import TileTooSmallError, tile_plan

__all__ = ["default_memory_budget", "estimate_inference_memory", "inference_tile_size"]

_GiB = 2**30


class _LivePeak(TorchDispatchMode):
    """The largest total size of the tensors alive at once during a (meta-device) run."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func.overloadpacket.__name__.endswith("_"):  # views and in-place: nothing new
            for tensor in tree_leaves(out):
                if isinstance(tensor, Tensor):
                    size = tensor.numel() * tensor.element_size()
                    self.live += size
                    weakref.finalize(tensor, self._free, size)
            self.peak = max(self.peak, self.live)
        return out


def estimate_inference_memory(module: nn.Module, region_shape: Sequence[int], dtype: torch.dtype | None = None) -> int:
    """Estimated peak bytes of one tile's no-grad forward on an input region of
    ``region_shape`` ``(N, C, *spatial)``: the region (in the trunk's dtype) plus the most
    activation bytes alive at once, from a run on PyTorch's ``meta`` device (shapes only).
    Also counts the region's raw pixels once more at one byte each (a uint8 slide region
    before its tile transform). Leaves out allocator caching and convolution workspaces:
    leave headroom."""
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = dtype or (parameter.dtype if parameter is not None else torch.float32)
    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in module.named_parameters()}
    stand_ins.update({name: torch.empty_like(t, device="meta") for name, t in module.named_buffers()})
    region = torch.empty(tuple(region_shape), dtype=dtype, device="meta")
    tally = _LivePeak()
    with torch.no_grad(), tally:
        out = torch.func.functional_call(module, stand_ins, (region,))
    del out
    return region.numel() * (region.element_size() + 1) + tally.peak


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
