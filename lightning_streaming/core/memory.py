"""What one run of a trunk on a tile costs, read from a run on the ``meta`` device.

A meta-device run computes shapes only (no memory, no arithmetic), so it is cheap at any
tile size. Following every PyTorch operator it calls gives what the budget planner
(:mod:`.budget`) needs: the bytes of every tensor the trunk allocates, the bytes autograd
keeps for the backward, the largest activation, the no-grad working set, and each
operator's FLOPs and bytes moved. Activations scale with the tile's pixels, so one run
at a reference region gives them per pixel.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class OpCost:
    """One operator of a trunk run: per input pixel, its FLOPs, the activation bytes it
    moves (read and written) and the bytes of the tensors it allocates; and the bytes of
    parameters and buffers it reads (once per run, whatever the tile)."""

    flops: float
    pixel_bytes: float
    allocated: float
    fixed_bytes: float


class _Trace(TorchDispatchMode):
    """Records every operator of a (meta-device) run: allocations, live bytes, FLOPs and
    bytes moved. ``constants`` are the ids of parameters and buffers (not activations)."""

    def __init__(self, constants: set[int], activation_size: int) -> None:
        super().__init__()
        self.constants, self.activation_size = constants, activation_size
        self.allocations: list[tuple[int, torch.dtype]] = []
        self.ops: list[tuple[float, int, int, int]] = []  # flops, activation bytes, allocated, constant bytes
        self.live = self.peak = 0

    def nbytes(self, tensor: Tensor) -> int:
        size = self.activation_size if tensor.dtype.is_floating_point else tensor.element_size()
        return tensor.numel() * size

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = _fast_meta(func, args) or func(*args, **kwargs)
        if func.is_view:  # views move and allocate nothing
            return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        allocated = 0
        if not func.overloadpacket.__name__.endswith("_"):  # in-place operations allocate nothing new
            self.allocations += [(t.numel(), t.dtype) for t in outputs]
            for t in outputs:
                nbytes = self.nbytes(t)
                allocated += nbytes
                self.live += nbytes
                weakref.finalize(t, self._free, nbytes)
            self.peak = max(self.peak, self.live)
        formula = flop_registry.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        moved = sum(self.nbytes(t) for t in inputs + outputs if id(t) not in self.constants)
        fixed = sum(self.nbytes(t) for t in inputs if id(t) in self.constants)
        self.ops.append((float(flops), moved, allocated, fixed))
        return out


_aten = torch.ops.aten
_EVAL_NORMS = {_aten.native_batch_norm.default: 5, _aten._native_batch_norm_legit_no_training.default: None}


def _fast_meta(func, args: tuple) -> tuple | None:  # type: ignore[no-untyped-def]
    """Outputs of an eval-mode batch norm on meta tensors, made directly: its meta kernel is
    a Python decomposition that costs milliseconds a call, most of a ResNet's trace."""
    if func not in _EVAL_NORMS:
        return None
    training = _EVAL_NORMS[func]
    if training is not None and (len(args) <= training or args[training]):
        return None
    x = args[0]
    if x.device.type != "meta":
        return None
    channels = x.shape[1] if x.dim() > 1 else 0
    return torch.empty_like(x), x.new_empty((channels,)), x.new_empty((channels,))


@dataclass(frozen=True)
class Cut:
    """Where a chain of modules (the children of a ``Sequential`` trunk) may be cut: after
    child ``index``, ``ops`` operators and ``saved`` bytes per pixel saved for the backward
    into the run, at a peak of ``no_grad_peak`` bytes per pixel so far without grad; the
    child's output has ``output`` bytes per pixel and ``channels`` channels."""

    index: int
    ops: int
    saved: float
    no_grad_peak: float
    output: float
    channels: int


@dataclass(frozen=True)
class TileProfile:
    """One run of a trunk, per input pixel of the tile (one image's pixel: multiply by the
    batch size and the region's pixels).

    ``ops``: every operator, with the bytes it allocates (autograd may keep any of them);
    ``saved``: the bytes autograd keeps from the forward for the backward (what a kept
    graph holds), with the tile's outputs; ``no_grad_peak``: the most bytes alive at once
    in a forward without grad; ``input``: the region itself, at the input's dtype, and its
    converted copy where the trunk computes in another dtype (see :func:`_region_bytes`).
    ``reference``: the region shape the run used; ``channels``: each output's channels;
    ``cuts``: where the trunk's chain of children may be cut (see :meth:`prefix`).
    """

    reference: tuple[int, ...]
    channels: tuple[int, ...]
    saved: float
    no_grad_peak: float
    input: float
    ops: tuple[OpCost, ...]
    cuts: tuple[Cut, ...] = ()

    @functools.cached_property
    def allocated(self) -> float:
        """Bytes per pixel of every tensor the forward allocates."""
        return sum(op.allocated for op in self.ops)

    @functools.cached_property
    def largest(self) -> float:
        """Bytes per pixel of the largest activation."""
        return max((op.allocated for op in self.ops), default=0.0)

    def working_set(self, pixels: float, input_grad: bool = False) -> float:
        """Peak bytes of one recompute-and-backward of a tile of ``pixels`` (batch included):
        everything the forward allocates, twice the largest activation for the gradients
        in flight, and the region (twice with its gradient). As
        :func:`estimate_tile_memory`."""
        return pixels * (self.allocated + 2 * self.largest + self.input * (2 if input_grad else 1))

    def kept(self, pixels: float) -> float:
        """Bytes a tile's graph kept from the forward holds until its backward."""
        return pixels * self.saved

    def inference_set(self, pixels: float) -> float:
        """Peak bytes of a forward without grad on a tile of ``pixels``."""
        return pixels * (self.no_grad_peak + self.input)

    def prefix(self, cut: Cut) -> "TileProfile":
        """The trunk up to ``cut``, per pixel of the trunk's input."""
        return TileProfile(self.reference, (cut.channels,), cut.saved + cut.output, cut.no_grad_peak, self.input,
                           self.ops[: cut.ops])  # fmt: skip

    def suffix(self, cut: Cut) -> "TileProfile":
        """The trunk after ``cut``, per pixel of the trunk's input; its input is the cut's output."""
        rest = self.ops[cut.ops :]
        largest = max((op.allocated for op in rest), default=0.0)
        return TileProfile(self.reference, self.channels, self.saved - cut.saved, 3 * largest, cut.output, rest)


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype the trunk computes in: its first floating-point parameter's."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else None


def _stand_ins(module: nn.Module, grad: bool) -> tuple[dict[str, Tensor], torch.dtype | None]:
    """Meta-device stand-ins of the parameters and buffers: the trunk itself is untouched."""
    stand_ins = {
        name: torch.empty_like(t, device="meta").requires_grad_(grad and t.requires_grad)
        for name, t in module.named_parameters()
    }
    stand_ins.update({name: torch.empty_like(t, device="meta") for name, t in module.named_buffers()})
    return stand_ins, _parameter_dtype(module)


def _meta_run(
    module: nn.Module, region_shape: Sequence[int], input_dtype: torch.dtype, activation_dtype: torch.dtype | None,
    grad: bool, boundaries: Sequence[nn.Module] = (),
) -> tuple[_Trace, dict[int, int], torch.dtype, tuple[int, ...], list[tuple]]:
    """Run ``module`` on a meta region; returns the trace, the storages autograd saved
    (with ``grad``: id -> bytes), the activation dtype used, the outputs' channels and,
    after each of ``boundaries`` (submodules), (operators, saved bytes, peak live bytes,
    output bytes, output channels) so far."""
    stand_ins, param_dtype = _stand_ins(module, grad)
    meta_dtype = param_dtype if param_dtype is not None else input_dtype
    activation_dtype = activation_dtype or meta_dtype
    constants = {id(t) for t in stand_ins.values()}
    trace = _Trace(constants, element_size(activation_dtype))
    saved: dict[int, int] = {}
    held: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        if id(tensor) not in constants:
            storage = tensor.untyped_storage()
            scale = trace.activation_size / tensor.element_size() if tensor.dtype.is_floating_point else 1
            saved[storage._cdata] = int(storage.nbytes() * scale)
            held.append(tensor)
        return tensor

    marks: list[tuple] = []

    def mark(_module: nn.Module, _inputs: object, output: object) -> None:
        leaf = output if isinstance(output, Tensor) and output.dim() > 1 else None
        nbytes, channels = (trace.nbytes(leaf), int(leaf.shape[1])) if leaf is not None else (0, 0)
        marks.append((len(trace.ops), sum(saved.values()), trace.peak, nbytes, channels))

    hooks = [b.register_forward_hook(mark) for b in boundaries]
    region = torch.empty(tuple(region_shape), dtype=meta_dtype, device="meta")
    try:
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trace:
            out = torch.func.functional_call(module, stand_ins, (region,))
        leaves = [leaf for leaf in tree_leaves(out) if isinstance(leaf, Tensor)]
        for leaf in leaves:  # a kept graph also holds the tile's outputs
            saved.setdefault(leaf.untyped_storage()._cdata, trace.nbytes(leaf))
        channels = tuple(int(leaf.shape[1]) if leaf.dim() > 1 else 1 for leaf in leaves)
        del out, held, leaves
    except Exception as error:  # any operation without a meta kernel
        raise RuntimeError(
            f"could not estimate the memory of {type(module).__name__} on a tile of shape {tuple(region_shape)} "
            f"({type(error).__name__}: {error}); pass an explicit tile_size instead of 'auto'"
        ) from error
    finally:
        for hook in hooks:
            hook.remove()
    return trace, saved, activation_dtype, channels, marks


def _region_bytes(module: nn.Module, input_dtype: torch.dtype) -> int:
    """Bytes per input value of a tile's region: as read, plus its converted copy where the
    trunk computes in another dtype (a uint8 slide region and its normalised float tile,
    which the tile transform makes before the trunk sees it)."""
    dtype = _parameter_dtype(module)
    size = element_size(input_dtype)
    if dtype is not None and dtype != input_dtype:
        size += element_size(dtype)
    return size


def profile_tile(
    module: nn.Module,
    region_shape: Sequence[int],
    *,
    input_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
    chain: Sequence[nn.Module] = (),
) -> TileProfile:
    """The :class:`TileProfile` of ``module`` from meta-device runs on a region of
    ``region_shape`` ``(N, C, *spatial)``: one without grad (allocations, FLOPs, bytes
    moved, the no-grad peak), one with grad (what autograd saves). ``chain``: the modules
    ``module`` runs one after another (a ``Sequential``'s children), each called once;
    the profile then records a :class:`Cut` after each."""
    pixels = math.prod(region_shape[2:]) * region_shape[0]
    trace, _, _, _, free = _meta_run(module, region_shape, input_dtype, activation_dtype, False, chain)
    _, saved, _, channels, kept = _meta_run(module, region_shape, input_dtype, activation_dtype, True, chain)
    input_bytes = math.prod(region_shape[1:]) * region_shape[0] * _region_bytes(module, input_dtype)
    cuts: tuple[Cut, ...] = ()
    if len(free) == len(kept) == len(chain):  # each child ran once
        cuts = tuple(
            Cut(i, ops, held / pixels, peak / pixels, out / pixels, c)
            for i, ((ops, _, peak, out, c), (_, held, _, _, _)) in enumerate(zip(free, kept))
        )
    return TileProfile(
        reference=tuple(int(s) for s in region_shape),
        channels=channels,
        saved=sum(saved.values()) / pixels,
        no_grad_peak=trace.peak / pixels,
        input=input_bytes / pixels,
        ops=tuple(OpCost(f / pixels, moved / pixels, new / pixels, fixed) for f, moved, new, fixed in trace.ops),
        cuts=cuts,
    )


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
    trace, _, dtype, _, _ = _meta_run(module, region_shape, input_dtype, activation_dtype, grad=False)
    size = element_size(dtype)
    sizes = [n * (size if d.is_floating_point else element_size(d)) for n, d in trace.allocations]
    region_bytes = math.prod(region_shape) * element_size(input_dtype)
    return sum(sizes) + 2 * max(sizes, default=0) + region_bytes * (2 if input_grad else 1)


