"""Choose the largest tile whose working set fits a memory budget, without running the trunk."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core import TileTooSmallError, tile_plan

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(budget: int | str) -> int:
    """``budget`` in bytes: an int, or a string such as ``"512MiB"``, ``"2GB"``, ``"1.5GiB"``."""
    if isinstance(budget, bool):
        raise TypeError(f"memory_budget must be a number of bytes or a string like '4GiB', got {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget {budget!r} is not a size; write bytes as an int or a string such as '512MiB', "
                "'2GB' or '1.5GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"memory_budget must be a number of bytes or a string like '4GiB', got {budget!r}")
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return value


class _Tally(TorchDispatchMode):
    """Records every newly allocated tensor of a (meta-device) run: (numel, dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # Views and in-place operations allocate nothing new.
        if not func.is_view and not name.endswith("_"):
            self.allocations += [(t.numel(), t.dtype) for t in tree_leaves(out) if isinstance(t, Tensor)]
        return out


def estimate_tile_memory(
    module: nn.Module,
    region_shape: Sequence[int],
    *,
    input_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
    input_grad: bool = False,
) -> int:
    """Estimated peak bytes of one tile's recompute-and-backward, for a trunk input region
    of ``region_shape`` ``(N, C, *spatial)``.

    The trunk runs once on the ``meta`` device (shapes only: no memory, no arithmetic) and
    every tensor it allocates is counted, since autograd may save any of them for the
    backward. Floating-point activations are counted at ``activation_dtype`` (the autocast
    dtype under mixed precision, else the parameters' dtype). To that come the input region
    (twice with ``input_grad``) and twice the largest activation, for the gradients in
    flight during the tile's backward.

    What it leaves out: allocator fragmentation and caching, convolution workspaces
    (cuDNN), and everything that does not grow with the tile (parameters, their gradients
    and optimizer state, the trunk's full output and its gradient, the head). It is an
    estimate to choose a tile size with, not a guarantee: leave headroom.
    """
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if activation_dtype is None:
        activation_dtype = param.dtype if param is not None else input_dtype
    # Shapes flow through meta stand-ins of the parameters and buffers: the trunk itself is untouched.
    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in module.named_parameters()}
    stand_ins.update({name: torch.empty_like(t, device="meta") for name, t in module.named_buffers()})
    meta_dtype = param.dtype if param is not None else input_dtype
    region = torch.empty(tuple(region_shape), dtype=meta_dtype, device="meta")
    tally = _Tally()
    try:
        with torch.no_grad(), tally:
            torch.func.functional_call(module, stand_ins, (region,))
    except Exception as error:  # any operation without a meta kernel
        raise RuntimeError(
            f"could not estimate the memory of {type(module).__name__} on a tile of shape {tuple(region_shape)} "
            f"({type(error).__name__}: {error}); pass an explicit tile_size instead of 'auto'"
        ) from error
    activation_size = torch.empty((), dtype=activation_dtype).element_size()
    sizes = [
        numel * (activation_size if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size())
        for numel, dtype in tally.allocations
    ]
    region_bytes = region.numel() * torch.empty((), dtype=input_dtype).element_size()
    return sum(sizes) + 2 * max(sizes, default=0) + region_bytes * (2 if input_grad else 1)


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
