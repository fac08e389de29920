"""Geometry rules for PyTorch's operators (ATen), one small function per kind of operator.

A rule receives an :class:`~.tracing.Op` (the operator, its arguments bound to PyTorch's
own signature, and what the analysis knows of the followed tensors among them), returns
the operator's outputs (fake tensors) after recording them, and raises
:class:`~.rules.Refusal` with a reason when the operator is not local. The tracer adds
where in the trunk the operator was called.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from .layout import Feat, LayoutError, describe, is_feature, reshape, spatial_atoms, spatial_dim, with_feature_sizes
from .rules import Refusal
from .tracing import Op, TraceInputError, Tracer, _returns_tensors
from .window import Resample, Spread, Window

aten = torch.ops.aten
Rule = Callable[[Op], Any]
RULES: dict[Any, Rule] = {}
# Rules that read sizes themselves: every other rule refuses a spatial size passed as a value.
_SIZE_AWARE: set = set()


def _register(*targets: Any, size_aware: bool = False) -> Callable[[Rule], Rule]:
    def decorate(rule: Rule) -> Rule:
        for target in targets:
            if isinstance(target, str):
                target = getattr(aten, target, None)
                if target is None:  # an operator this PyTorch version does not have
                    continue
            RULES[target] = rule
            if size_aware:
                _SIZE_AWARE.add(target)
        return rule

    return decorate


def rule_for(func: Any) -> Rule:
    rule = RULES.get(func) or RULES.get(func.overloadpacket) or _default
    size_aware = func in _SIZE_AWARE or func.overloadpacket in _SIZE_AWARE

    def checked(op: Op) -> Any:
        if rule is _default and torch.Tag.nondeterministic_seeded in op.func.tags:
            # Even on constants (a stochastic-depth mask): the recomputed tile would draw other values.
            return _default(op)
        if not op.spatial:
            return _constant(op)
        if not size_aware and any(op.symbols.depends(a) for a in pytree.tree_leaves((op.args, op.kwargs))):
            raise Refusal(
                f"it passes a spatial size of the feature map to {op.name} as a value (e.g. x * x.shape[-1], or a "
                "padding or position computed from the size), and that size differs between tiles"
            )
        return rule(op)

    return checked


def _dim(index: int, ndim: int) -> int:
    return index + ndim if index < 0 else index


def _dims(value: Any, ndim: int) -> list[int]:
    """A dim argument as a list of non-negative dims; None or [] means every dim."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return list(range(ndim))
    if isinstance(value, int):
        return [_dim(value, ndim)]
    return [_dim(int(v), ndim) for v in value]


def _first(op: Op, name: str = "self") -> tuple[Tensor, Any]:
    """The followed tensor passed as argument ``name``; refuse when the followed tensor is
    another argument (a weight computed from the image)."""
    tensor = op.arg(name)
    value = op.value(tensor)
    if value is None:
        raise Refusal(f"its {name if name != 'self' else 'input'} is a constant but another argument is computed "
                      "from the image (e.g. a weight made from the feature map)")  # fmt: skip
    return tensor, value


def _spatial_names(dims: Sequence[Any]) -> str:
    return ", ".join(f"s{d}" for dim in dims for d in spatial_atoms(dim))


# --------------------------------------------------------------------------- default


_POINTWISE_NAMES = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub", "true_divide", "floor_divide", "where",
    "eq", "ne", "gt", "ge", "lt", "le", "fmod", "remainder", "hardswish", "hardswish_", "copy", "fill",
    "masked_fill", "masked_fill_", "maximum", "minimum", "pow", "pow_", "logical_and", "logical_or", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_xor", "clamp", "clamp_", "clip", "heaviside", "xlogy", "lerp", "lerp_",
    "addcmul", "addcdiv", "erfinv", "sgn", "type_as", "log_sigmoid_forward", "softplus", "gelu", "gelu_",
    "leaky_relu_", "threshold_", "hardsigmoid_", "mish_", "silu_", "relu_", "sigmoid_", "tanh_", "zeros_like",
    "_prelu_kernel",
}  # fmt: skip


def _is_pointwise(func: Any) -> bool:
    return torch.Tag.pointwise in func.tags or func.overloadpacket.__name__ in _POINTWISE_NAMES


def _default(op: Op) -> Any:
    if torch.Tag.nondeterministic_seeded in op.func.tags:
        raise Refusal(
            "it draws random numbers (dropout, stochastic depth, noise or RReLU in training mode), so a tile "
            "recomputed for the backward would see other values than in the forward; set the trunk to eval mode "
            "or move that layer to the head"
        )
    if not op.spatial:
        return _constant(op)
    if not _returns_tensors(op.func):
        return op.call()  # sizes, strides, devices: the same questions PyTorch's own code asks
    if _is_pointwise(op.func):
        return _pointwise(op)
    raise Refusal(
        f"streaming has no rule for the operator {op.name}, so it cannot prove it is local. If it is, wrap it in a "
        "module and register a rule with lightning_streaming.register_module_rule; if it looks at the whole feature "
        "map, move it to the head"
    )


_UNIFORM_FACTORIES = {
    "empty", "empty_strided", "zeros", "ones", "full", "new_empty", "new_empty_strided", "new_zeros", "new_ones",
    "new_full", "empty_like", "zeros_like", "ones_like", "full_like", "fill_", "zero_", "fill", "expand", "view",
    "_unsafe_view", "clone", "_to_copy", "detach", "alias", "unsqueeze", "permute", "contiguous",
}  # fmt: skip


def _constant(op: Op) -> Any:
    """An operator on constants only: constant too, unless it builds a tensor from a spatial size."""
    tracer = op.tracer
    leaves = pytree.tree_leaves((op.args, op.kwargs))
    uniform_input = any(tracer.is_uniform(a) for a in leaves)
    sized = any(op.symbols.depends(a) for a in leaves)
    if not (sized or uniform_input):
        return op.call()
    if torch.Tag.nondeterministic_seeded in op.func.tags:
        return _default(op)  # random values the size of a feature map: refused as random
    name = op.func.overloadpacket.__name__
    if not _returns_tensors(op.func):
        return op.call()
    if name in _UNIFORM_FACTORIES or (uniform_input and _is_pointwise(op.func)):
        out = op.call()
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, Tensor):
                tracer.uniform[id(tensor)] = tensor
        return out
    raise Refusal(
        f"it builds values from a spatial size of the feature map ({op.name}: positions, coordinates, "
        "masks or encodings over the image, as in CoordConv or positional embeddings); a tile would get its own "
        "positions, not the image's; move it to the head"
    )


@_register("empty", "empty_strided", "zeros", "ones", "full", "new_empty", "new_empty_strided", "new_zeros",
           "new_ones", "new_full", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
           "randint_like", "empty_permuted", size_aware=True)  # fmt: skip
def _factory(op: Op) -> Any:
    """A new tensor that takes only the dtype, device or shape of a feature map: the same
    value at every pixel (random ones are refused)."""
    if torch.Tag.nondeterministic_seeded in op.func.tags:
        return _default(op)
    out = op.call()
    op.tracer.uniform[id(out)] = out
    return out


# ------------------------------------------------------------------------- pixel-wise


def _broadcast_layout(op: Op, tensors: list[Tensor], ndim: int) -> tuple:
    """The layout of a broadcast of ``tensors`` to ``ndim`` dimensions. Constants must not
    vary along a spatial dimension; followed tensors must agree on where theirs are."""
    tracer = op.tracer
    layout = []
    for i in range(ndim):
        k = ndim - i  # position from the right
        atoms = None
        for t in tensors:
            value = op.value(t)
            if value is not None and t.dim() >= k:
                here = value.layout[t.dim() - k]
                if not is_feature(here):
                    if atoms is not None and atoms != here:
                        raise Refusal(
                            f"it combines feature maps whose spatial dimensions do not line up "
                            f"({' and '.join(describe(op.value(x).layout) for x in tensors if op.value(x))})"
                        )
                    atoms = here
        if atoms is None:
            layout.append(())
            continue
        for t in tensors:
            if t.dim() < k:
                continue
            value = op.value(t)
            size = op.symbols.hint(t.shape[t.dim() - k])
            if value is not None:
                if value.layout[t.dim() - k] != atoms:
                    raise Refusal(
                        f"it broadcasts a feature map of layout {describe(value.layout)} over spatial dimension(s) "
                        f"{_spatial_names([atoms])} of another"
                    )
            elif not tracer.is_uniform(t) and size != 1:
                raise Refusal(
                    f"a constant of shape {tuple(t.shape)} varies along spatial dimension(s) {_spatial_names([atoms])}, "
                    "so its value depends on the absolute position, not on the tile (a position embedding); "
                    "make it constant along space or move it to the head"
                )
        layout.append(atoms)
    return tuple(layout)


def _pointwise(op: Op) -> Any:
    tensors = [t for t in pytree.tree_leaves((op.args, op.kwargs)) if isinstance(t, Tensor)]
    ndim = max(t.dim() for t in tensors)
    layout = _broadcast_layout(op, tensors, ndim)
    node = op.merged_node()
    out = op.call(aligned=True)
    extents = _extents(op)
    first = None
    for tensor in pytree.tree_leaves(out):
        if isinstance(tensor, Tensor) and tensor.dim() == ndim:
            _emit_inplace_aware(op, tensor, node, with_feature_sizes(layout, tensor.shape), extents)
            first = tensor
    if first is None:
        raise Refusal(f"internal: {op.name} returned no tensor of the broadcast shape")
    return out


def _extents(op: Op) -> dict:
    extents: dict = {}
    for _, value in op.spatial:
        for d, e in value.extents.items():
            extents.setdefault(d, e)
    return extents


def _emit_inplace_aware(op: Op, out: Tensor, node: int, layout: tuple, extents: dict) -> None:
    op.emit(out, node, layout, extents)
    base = out._base
    # An in-place operation through a view of all of a feature map changes the map itself.
    if base is not None and op.tracer.values.get(id(base), (None,))[0] is base:
        base_value = op.tracer.values[id(base)][1]
        if op.symbols.hint(base.numel()) == op.symbols.hint(out.numel()):
            op.tracer.track(base, node, base_value.layout, base_value.extents)


for _name in _POINTWISE_NAMES:
    _register(_name)(lambda op: _pointwise(op) if op.spatial else _constant(op))


# ----------------------------------------------------------------------- shape only


@_register("view", "_unsafe_view", "reshape", "_reshape_alias", "squeeze", "unsqueeze", "view_as", "flatten",
           "unflatten", "squeeze_", "unsqueeze_", "view_copy", "_unsafe_view_copy", size_aware=True)  # fmt: skip
def _reshape(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    tensor, value = op.spatial[0]
    out = op.call()
    try:
        layout = reshape(value.layout, value.extents, [op.symbols.expression(s) for s in out.shape])
    except LayoutError as error:
        raise Refusal(
            f"{error} (flattening, or attention over positions); a tile cannot reproduce it, so it belongs in the head"
        ) from None
    return op.emit(out, value.node, layout, value.extents)


@_register("permute", "permute_copy")
def _permute(op: Op) -> Any:
    tensor, value = op.spatial[0]
    dims = [_dim(d, tensor.dim()) for d in op.arg("dims")]
    return op.emit(op.call(), value.node, tuple(value.layout[d] for d in dims), value.extents)


@_register("transpose", "transpose_", "transpose_copy", "swapaxes", "swapdims")
def _transpose(op: Op) -> Any:
    tensor, value = op.spatial[0]
    a, b = _dim(op.arg("dim0"), tensor.dim()), _dim(op.arg("dim1"), tensor.dim())
    layout = list(value.layout)
    layout[a], layout[b] = layout[b], layout[a]
    return op.emit(op.call(), value.node, tuple(layout), value.extents)


@_register("t", "t_", "numpy_T")
def _t(op: Op) -> Any:
    tensor, value = op.spatial[0]
    return op.emit(op.call(), value.node, tuple(reversed(value.layout)), value.extents)


@_register("alias", "clone", "detach", "lift_fresh", "_to_copy", "contiguous", "_conj", "resolve_conj", "resolve_neg",
           "lift_fresh_copy", "alias_copy", "detach_copy", "dropout", "feature_dropout")  # fmt: skip
def _same(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    tensor, value = op.spatial[0]
    if op.func.overloadpacket.__name__ in ("dropout", "feature_dropout") and op.arg("train") and op.arg("p"):
        return _refuse_dropout(op)
    return op.emit(op.call(), value.node, value.layout, value.extents)


@_register("expand", "expand_copy", size_aware=True)
def _expand(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    tensor, value = op.spatial[0]
    out = op.call()
    offset = out.dim() - tensor.dim()
    layout = []
    for i, size in enumerate(out.shape):
        if i < offset:
            layout.append(())
            continue
        atoms = value.layout[i - offset]
        if not is_feature(atoms):
            layout.append(atoms)
        elif op.symbols.depends(size):
            raise Refusal("it expands a per-pixel value to the size of a spatial dimension")
        else:
            layout.append(atoms)
    return op.emit(out, value.node, with_feature_sizes(tuple(layout), out.shape), value.extents)


@_register("slice", "slice_copy", size_aware=True)
def _slice(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    tensor, value = op.spatial[0]
    dim = _dim(op.arg("dim", 0), tensor.dim())
    atoms = value.layout[dim]
    if is_feature(atoms):
        if any(op.symbols.depends(op.arg(n)) for n in ("start", "end")):
            raise Refusal("it slices channels at a position computed from a spatial size")
        out = op.call()
        return op.emit(out, value.node, with_feature_sizes(value.layout, out.shape), value.extents)
    d = spatial_dim(atoms)
    if d is None:
        raise Refusal(f"it slices dimension {dim} of layout {describe(value.layout)}, which merges spatial positions")
    length = value.extents[d]
    step = int(op.arg("step", 1) or 1)
    start = _crop_margin(op, op.arg("start"), length, from_end=False)
    end = _crop_margin(op, op.arg("end"), length, from_end=True)
    window = Window(kernel=1, stride=step, pad_lo=-start, pad_hi=end)
    node = op.tracer.add_node((value.node,), _one(d, window, op.tracer.spatial_dims))
    extents = dict(value.extents)
    new = op.tracer.fresh_extents(node, [d])
    extents.update({k: op.symbols.expression(v) for k, v in new.items()})
    # The result is a real view (it shares the version counter with its base), with our size symbol.
    sizes = list(tensor.shape)
    strides = list(tensor.stride())
    offset = tensor.storage_offset() + start * strides[dim]
    sizes[dim] = new[d]
    strides[dim] = strides[dim] * step
    out = aten.as_strided.default(tensor, sizes, strides, offset)
    return op.emit(out, node, value.layout, extents)


def _crop_margin(op: Op, bound: Any, length: Any, from_end: bool) -> int:
    """A slice bound on a spatial dimension as a crop margin: the pixels removed from the
    start (from_end=False) or, as a number <= 0, from the end. Bounds measured from the
    other border, or at absolute positions, are refused."""
    if bound is None:
        return 0
    if isinstance(bound, int):
        if not from_end:
            if bound >= 0:
                return bound
            raise Refusal(
                f"it keeps the last {-bound} pixels of a spatial dimension (x[..., {bound}:]): a position counted from "
                "the far border, which a tile does not share"
            )
        if bound >= sys.maxsize // 2:
            return 0
        if bound < 0:
            return bound
        raise Refusal(
            f"it cuts a spatial dimension at the absolute position {bound} (x[..., :{bound}]); only crops by a "
            "constant margin at each border (x[..., 2:-2]) are local"
        )
    difference = op.symbols.expression(bound) - op.symbols.expression(length)
    if difference.is_Integer and from_end:
        return min(int(difference), 0)
    raise Refusal(
        "it slices a spatial dimension at a position computed from its size other than a constant margin from "
        "the end (x[..., :h - 2] is fine)"
    )


def _one(d: int, window: Any, dims: int) -> tuple:
    return tuple(window if i == d else None for i in range(dims))


@_register("select", "select_copy")
def _select(op: Op) -> Any:
    tensor, value = op.spatial[0]
    dim = _dim(op.arg("dim"), tensor.dim())
    if not is_feature(value.layout[dim]):
        raise Refusal(f"it picks one position of spatial dimension(s) {_spatial_names([value.layout[dim]])}")
    out = op.call()
    return op.emit(out, value.node, value.layout[:dim] + value.layout[dim + 1 :], value.extents)


@_register("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "unbind", "split_copy",
           "split_with_sizes_copy", "unbind_copy", "tensor_split")  # fmt: skip
def _split(op: Op) -> Any:
    tensor, value = op.spatial[0]
    dim = _dim(op.arg("dim", 0), tensor.dim())
    if not is_feature(value.layout[dim]):
        raise Refusal(f"it splits along spatial dimension(s) {_spatial_names([value.layout[dim]])}")
    outs = op.call()
    unbind = op.func.overloadpacket.__name__ in ("unbind", "unbind_copy")
    for out in outs:
        layout = value.layout[:dim] + value.layout[dim + 1 :] if unbind else value.layout
        op.emit(out, value.node, with_feature_sizes(layout, out.shape), value.extents)
    return outs


@_register("index_select", "flip", "repeat_interleave", "channel_shuffle", "native_channel_shuffle")
def _along_features(op: Op) -> Any:
    tensor, value = _first(op)
    dims = op.arg("dims") if op.arg("dims") is not None else op.arg("dim")
    if op.func.overloadpacket.__name__ in ("channel_shuffle", "native_channel_shuffle"):
        dims = 1
    for d in _dims(dims, tensor.dim()):
        if not is_feature(value.layout[d]):
            raise Refusal(
                f"it rearranges spatial dimension(s) {_spatial_names([value.layout[d]])} ({op.name}), so a pixel's "
                "result comes from far away in the image"
            )
    out = op.call()
    return op.emit(out, value.node, with_feature_sizes(value.layout, out.shape), value.extents)


@_register("roll")
def _roll(op: Op) -> Any:
    tensor, value = op.spatial[0]
    if not op.arg("dims"):
        raise Refusal("it rolls the flattened feature map, wrapping positions around the image's border")
    return _along_features(op)


@_register("repeat")
def _repeat(op: Op) -> Any:
    tensor, value = op.spatial[0]
    repeats = list(op.arg("repeats"))
    offset = len(repeats) - tensor.dim()
    for i, atoms in enumerate(value.layout):
        if not is_feature(atoms) and repeats[offset + i] != 1:
            raise Refusal("it repeats the feature map along a spatial dimension (tiling the image)")
    out = op.call()
    layout = ((),) * offset + value.layout
    return op.emit(out, value.node, with_feature_sizes(layout, out.shape), value.extents)


@_register("index")
def _index(op: Op) -> Any:
    tensor, value = _first(op)
    indices = list(op.arg("indices"))
    used = [i for i, index in enumerate(indices) if index is not None]
    if any(op.value(indices[i]) is not None for i in used):
        raise Refusal("it indexes with positions computed from the image (data-dependent gathering)")
    if len(used) != 1 or indices[used[0]].dim() != 1:
        raise Refusal("it uses advanced indexing with several index tensors; index one feature dimension at a time")
    if not is_feature(value.layout[used[0]]):
        raise Refusal(f"it indexes spatial dimension(s) {_spatial_names([value.layout[used[0]]])} with a tensor")
    out = op.call()
    return op.emit(out, value.node, with_feature_sizes(value.layout, out.shape), value.extents)


@_register("gather")
def _gather(op: Op) -> Any:
    tensor, value = _first(op)
    dim = _dim(op.arg("dim"), tensor.dim())
    index_value = op.value(op.arg("index"))
    if not is_feature(value.layout[dim]) or index_value is None or index_value.layout != value.layout:
        raise Refusal("it gathers along a spatial dimension, or with indices that are not per-pixel")
    out = op.call(aligned=True)
    return op.emit(out, op.merged_node(), value.layout, value.extents)


@_register("stack")
def _stack(op: Op) -> Any:
    """Feature maps stacked along a new dimension that is not spatial (a new feature dimension)."""
    tensors = list(op.arg("tensors"))
    values = [op.value(t) for t in tensors]
    if any(v is None for v in values) or any(v.layout != values[0].layout for v in values):
        raise Refusal("it stacks a feature map with a constant, or feature maps whose dimensions do not line up")
    dim = _dim(op.arg("dim", 0), tensors[0].dim() + 1)
    node = op.merged_node(values)
    out = op.call(aligned=True)
    layout = values[0].layout[:dim] + ((Feat(len(tensors)),) if len(tensors) > 1 else (),) + values[0].layout[dim:]
    return op.emit(out, node, layout, _extents(op))


@_register("cat", "concat", "concatenate")
def _cat(op: Op) -> Any:
    tensors = [t for t in op.arg("tensors") if not (t.dim() == 1 and op.symbols.hint(t.shape[0]) == 0)]
    values = [op.value(t) for t in tensors]
    if any(v is None for v in values):
        raise Refusal(
            "it concatenates a feature map with a constant tensor; concatenate feature maps only (expand a "
            "per-channel constant with a 1x1 convolution's bias instead)"
        )
    ndim = tensors[0].dim()
    dim = _dim(op.arg("dim", 0), ndim)
    first = values[0].layout
    for v in values:
        if not is_feature(v.layout[dim]):
            raise Refusal(f"it concatenates along spatial dimension(s) {_spatial_names([v.layout[dim]])}")
        if any(a != b for i, (a, b) in enumerate(zip(v.layout, first)) if i != dim):
            raise Refusal(
                f"it concatenates feature maps whose spatial dimensions do not line up ({describe(v.layout)} and "
                f"{describe(first)})"
            )
    node = op.merged_node(values)
    out = op.call(aligned=True)
    return op.emit(out, node, with_feature_sizes(first, out.shape), _extents(op))


# ----------------------------------------------------------------------- reductions


_REDUCTIONS = (
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod", "logsumexp",
    "linalg_vector_norm", "norm", "argmax", "argmin", "all", "any", "nansum", "nanmean", "aminmax", "count_nonzero",
    "cumsum", "cumsum_", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "topk", "kthvalue", "median",
    "nanmedian", "mode", "_softmax", "_log_softmax", "_safe_softmax", "softmax", "log_softmax", "glu", "argsort",
    "msort",
)  # fmt: skip


@_register(*_REDUCTIONS)
def _reduction(op: Op) -> Any:
    tensor, value = _first(op)
    dim = op.arg("dim") if op.arg("dim") is not None else op.arg("dims")
    if op.func.overloadpacket.__name__ in ("msort",):
        dim = 0
    reduced = _dims(dim, tensor.dim())
    spatial = [value.layout[d] for d in reduced if not is_feature(value.layout[d])]
    if spatial:
        name = op.func.overloadpacket.__name__
        if "softmax" in name:
            what = "it normalises over a spatial dimension (a softmax over positions)"
        elif name in ("cumsum", "cumsum_", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "argsort", "topk"):
            what = f"it scans or sorts along a spatial dimension ({op.name})"
        else:
            what = (
                f"it reduces over spatial dimension(s) {_spatial_names(spatial)} ({op.name}: global pooling, or "
                "statistics of the whole feature map as in squeeze-and-excitation or global response normalisation)"
            )
        raise Refusal(f"{what}; every tile sees only its part of the image, so this belongs in the head")
    outs = op.call()
    for out in pytree.tree_leaves(outs):
        if not isinstance(out, Tensor):
            continue
        if out.dim() == tensor.dim():
            layout = value.layout
        else:
            layout = tuple(atoms for d, atoms in enumerate(value.layout) if d not in reduced)
        if len(layout) == out.dim():
            op.emit(out, value.node, with_feature_sizes(layout, out.shape), value.extents)
    return outs


# ----------------------------------------------------------------------- matrix products


def _product(op: Op, a: Tensor, b: Tensor, batched: bool) -> Any:
    va, vb = op.value(a), op.value(b)
    offset = 1 if batched else 0
    contract = [va.layout[offset + 1]] if va else []
    contract += [vb.layout[offset]] if vb else []
    if any(not is_feature(c) for c in contract):
        raise Refusal(
            f"it is a matrix product over spatial positions ({op.name}: attention, or a dense layer over a flattened "
            "feature map), which mixes every position with every other; it belongs in the head"
        )
    rows = va.layout[offset] if va else ()
    cols = vb.layout[offset + 1] if vb else ()
    batch: tuple = ()
    if batched:
        batches = [v.layout[0] for v in (va, vb) if v is not None]
        if len(batches) == 2 and batches[0] != batches[1] and not (is_feature(batches[0]) and is_feature(batches[1])):
            raise Refusal(f"it multiplies feature maps whose spatial dimensions do not line up ({op.name})")
        batch = next((b_ for b_ in batches if not is_feature(b_)), batches[0])
        if not is_feature(batch) and not (is_feature(rows) and is_feature(cols)):
            raise Refusal(f"it multiplies spatial positions with each other ({op.name})")
    if not is_feature(rows) and not is_feature(cols):
        raise Refusal(f"it forms products of every position with every other ({op.name}): attention belongs in the head")
    layout = ((batch,) if batched else ()) + (rows, cols)
    node = op.merged_node([v for v in (va, vb) if v is not None])
    out = op.call(aligned=True)
    return op.emit(out, node, with_feature_sizes(layout, out.shape), _extents(op))


@_register("mm")
def _mm(op: Op) -> Any:
    return _product(op, op.arg("self"), op.arg("mat2"), batched=False)


@_register("addmm")
def _addmm(op: Op) -> Any:
    if op.value(op.arg("self")) is not None:
        raise Refusal("it adds a feature map as the bias of a matrix product; add it separately")
    return _product(op, op.arg("mat1"), op.arg("mat2"), batched=False)


@_register("bmm")
def _bmm(op: Op) -> Any:
    return _product(op, op.arg("self"), op.arg("mat2"), batched=True)


@_register("baddbmm")
def _baddbmm(op: Op) -> Any:
    if op.value(op.arg("self")) is not None:
        raise Refusal("it adds a feature map as the bias of a batched matrix product; add it separately")
    return _product(op, op.arg("batch1"), op.arg("batch2"), batched=True)


# ------------------------------------------------------------------------------- norms


NORM_STATISTICS = (
    "it normalises with statistics of the whole batch of images or of the whole feature map (BatchNorm in "
    "training mode, or InstanceNorm/BatchNorm without running statistics); in eval mode with running statistics it "
    "is local. Call .eval() on the trunk's norm layers (freeze them), move them to the head, or use StreamingLSUV "
    "initialisation instead"
)


@_register("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
           "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm",
           "_batch_norm_with_update", "_batch_norm_no_update")  # fmt: skip
def _batch_norm(op: Op) -> Any:
    name = op.func.overloadpacket.__name__
    training = op.arg("training", False) if name != "_batch_norm_with_update" else True
    if training or op.arg("running_mean") is None:
        raise Refusal(NORM_STATISTICS)
    tensor, value = _first(op, "input")
    if not is_feature(value.layout[1]):
        raise Refusal("its channels dimension holds spatial positions")
    out = tensor.new_empty(tensor.shape)
    op.emit(out, value.node, value.layout, value.extents)
    extra = [tensor.new_empty((0,)) for _ in op.func._schema.returns[1:]]
    return (out, *extra) if extra else out


@_register("native_group_norm", "group_norm", size_aware=True)
def _group_norm(op: Op) -> Any:
    raise Refusal(
        "GroupNorm normalises with statistics of the whole feature map (per group of channels); move it to the head, "
        "or use a per-pixel normalisation such as LayerNorm over channels"
    )


@_register("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(op: Op) -> Any:
    tensor, value = _first(op, "input")
    count = len(op.arg("normalized_shape"))
    over = value.layout[tensor.dim() - count :]
    if any(not is_feature(atoms) for atoms in over):
        raise Refusal(
            f"it normalises over spatial dimension(s) {_spatial_names(over)} (layout {describe(value.layout)}); only "
            "per-pixel normalisation over channels (channels last, as in ConvNeXt) is local"
        )
    out = tensor.new_empty(tensor.shape)
    op.emit(out, value.node, value.layout, value.extents)
    returns = len(op.func._schema.returns)
    if returns == 1:
        return out
    stats_shape = tuple(tensor.shape[: tensor.dim() - count]) + (1,) * count
    stats_layout = value.layout[: tensor.dim() - count] + ((),) * count
    extra = []
    for _ in range(returns - 1):
        stat = tensor.new_empty(stats_shape)
        op.emit(stat, value.node, stats_layout, value.extents)
        extra.append(stat)
    return (out, *extra)


def _refuse_dropout(op: Op) -> Any:
    raise Refusal(
        "Dropout in training mode is random, so recomputed tiles would see other masks; put it in the head or set "
        "it to eval mode"
    )


@_register("rrelu_with_noise", "rrelu_with_noise_", "rrelu", "rrelu_")
def _rrelu(op: Op) -> Any:
    """RReLU draws its slopes at random in training mode; in eval mode it is a leaky ReLU."""
    if op.arg("training"):
        return _default(op)
    if not op.spatial:
        return _constant(op)
    return _pointwise(op)


@_register("native_dropout")
def _native_dropout(op: Op) -> Any:
    if op.arg("train") is not False and op.arg("p"):
        return _refuse_dropout(op)
    tensor, value = op.spatial[0]
    outs = op.call()
    for out in outs:
        op.emit(out, value.node, value.layout, value.extents)
    return outs


# ------------------------------------------------------------------------- windows


def _windowed(op: Op, tensor: Tensor, value: Any, dims: Sequence[int], windows: Sequence[Any],
              feature_length: Callable[[int, int], int], out_channels: int | None = None,
              channel_dim: int | None = 1) -> Tensor:  # fmt: skip
    """The output of a windowed operation over tensor dimensions ``dims`` (one window each),
    with fresh size symbols; a windowed dimension that holds only features changes size
    by ``feature_length(index, size)``."""
    per_spatial: dict[int, Any] = {}
    feature_sizes: dict[int, int] = {}
    for i, (dim, window) in enumerate(zip(dims, windows)):
        atoms = value.layout[dim]
        d = spatial_dim(atoms)
        if d is not None:
            per_spatial[d] = window
        elif is_feature(atoms):
            feature_sizes[dim] = feature_length(i, int(op.symbols.hint(tensor.shape[dim])))
        else:
            raise Refusal(
                f"it slides a window over dimension {dim} of layout {describe(value.layout)}, which merges spatial "
                "positions with other values"
            )
    if channel_dim is not None and not is_feature(value.layout[channel_dim]):
        raise Refusal(f"its channel dimension holds spatial positions (layout {describe(value.layout)})")
    tracer = op.tracer
    node = tracer.add_node((value.node,), tuple(per_spatial.get(d) for d in range(tracer.spatial_dims)))
    fresh = tracer.fresh_extents(node, per_spatial)
    extents = dict(value.extents)
    extents.update({d: op.symbols.expression(s) for d, s in fresh.items()})
    shape = list(tensor.shape)
    layout = list(value.layout)
    for dim in dims:
        d = spatial_dim(value.layout[dim])
        if d is not None:
            shape[dim] = fresh[d]
        else:
            shape[dim] = feature_sizes[dim]
            layout[dim] = () if feature_sizes[dim] == 1 else (Feat(feature_sizes[dim]),)
    if out_channels is not None:
        assert channel_dim is not None
        shape[channel_dim] = out_channels
        layout[channel_dim] = () if out_channels == 1 else (Feat(out_channels),)
    out = tensor.new_empty(shape)
    return op.emit(out, node, tuple(layout), extents)


def _ints(value: Any, count: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value]
        return values * count if len(values) == 1 else values
    return [int(value)] * count


@_register("convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "mkldnn_convolution",
           "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")  # fmt: skip
def _convolution(op: Op) -> Any:
    tensor, value = _first(op, "input")
    weight = op.arg("weight")
    if weight is None or op.value(weight) is not None or op.value(op.arg("bias")) is not None:
        raise Refusal("its weight or bias is computed from the image")
    name = op.func.overloadpacket.__name__
    transposed = bool(op.arg("transposed", name.startswith("conv_transpose")))
    count = weight.dim() - 2
    stride = _ints(op.arg("stride", 1), count)
    padding = op.arg("padding", 0)
    dilation = _ints(op.arg("dilation", 1), count)
    groups = int(op.arg("groups", 1))
    if tensor.dim() != count + 2:
        raise Refusal(f"it is a {count}D convolution of a {tensor.dim()}-dimensional tensor")
    kernel = [int(k) for k in weight.shape[2:]]
    channels = int(op.symbols.hint(tensor.shape[1]))
    expected = int(weight.shape[0 if transposed else 1]) * (1 if transposed else groups)
    if channels != expected:
        raise TraceInputError(f"expects {expected} input channels but receives {channels}", expected)
    if isinstance(padding, str):  # "same" / "valid" of conv1d/2d/3d
        pads = []
        for k, d in zip(kernel, dilation):
            total = 0 if padding == "valid" else d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in _ints(padding, count)]
    if transposed:
        output_padding = _ints(op.arg("output_padding", 0), count)
        windows = [Spread(k, s, d, lo, o) for k, s, d, (lo, _), o in zip(kernel, stride, dilation, pads, output_padding)]
        out_channels = int(weight.shape[1]) * groups
    else:
        windows = [Window(k, s, d, lo, hi) for k, s, d, (lo, hi) in zip(kernel, stride, dilation, pads)]
        out_channels = int(weight.shape[0])
    dims = list(range(2, 2 + count))
    return _windowed(op, tensor, value, dims, windows, lambda i, n: windows[i].output_length(n), out_channels)


def _pool(op: Op, maximum: bool) -> Any:
    tensor, value = _first(op)
    kernel_arg = op.arg("kernel_size")
    count = len(kernel_arg) if isinstance(kernel_arg, (list, tuple)) and len(kernel_arg) > 1 else _pool_dims(op)
    kernel = _ints(kernel_arg, count)
    stride = op.arg("stride")
    stride = kernel if stride is None or len(stride) == 0 else _ints(stride, count)
    padding = _ints(op.arg("padding", 0), count)
    dilation = _ints(op.arg("dilation", 1), count) if maximum else [1] * count
    ceil_mode = bool(op.arg("ceil_mode", False))
    windows = [Window(k, s, d, p, p, ceil_mode) for k, s, d, p in zip(kernel, stride, dilation, padding)]
    dims = list(range(tensor.dim() - count, tensor.dim()))
    out = _windowed(op, tensor, value, dims, windows, lambda i, n: windows[i].output_length(n), channel_dim=None)
    if not maximum:
        return out
    indices = out.new_empty(out.shape, dtype=torch.int64)
    op.tracer.positional[id(indices)] = (
        indices,
        f"it uses the indices of the max pooling in {op.tracer.node_name()} (return_indices=True), which are "
        "positions in the tile, not in the image",
    )
    return out, indices


def _pool_dims(op: Op) -> int:
    name = op.func.overloadpacket.__name__
    return 3 if "3d" in name else 1 if "1d" in name else 2


@_register("max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices")
def _max_pool(op: Op) -> Any:
    return _pool(op, maximum=True)


@_register("max_pool1d", "max_pool2d", "max_pool3d", "mkldnn_max_pool2d", "mkldnn_max_pool3d")
def _max_pool_only(op: Op) -> Any:
    return _pool(op, maximum=True)[0]


@_register("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(op: Op) -> Any:
    return _pool(op, maximum=False)


@_register("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
           size_aware=True)  # fmt: skip
def _adaptive_pool(op: Op) -> Any:
    tensor, value = _first(op)
    sizes = list(op.arg("output_size"))
    dims = range(tensor.dim() - len(sizes), tensor.dim())
    for dim, size in zip(dims, sizes):
        atoms = value.layout[dim]
        if not is_feature(atoms):
            d = spatial_dim(atoms)
            if d is None or op.symbols.expression(size) != value.extents[d]:
                raise Refusal(
                    "adaptive (global) pooling looks at the whole feature map; put it in the head, after the "
                    "streamed trunk"
                )
    outs = op.call()
    first = outs[0] if isinstance(outs, (tuple, list)) else outs
    op.emit(first, value.node, with_feature_sizes(value.layout, first.shape), value.extents)
    return outs


_PAD_MODES = {"constant_pad_nd": "zeros", "reflection_pad1d": "reflect", "reflection_pad2d": "reflect",
              "reflection_pad3d": "reflect", "replication_pad1d": "replicate", "replication_pad2d": "replicate",
              "replication_pad3d": "replicate"}  # fmt: skip


@_register(*_PAD_MODES, size_aware=True)
def _pad(op: Op) -> Any:
    tensor, value = _first(op)
    amounts = op.arg("pad") if op.arg("pad") is not None else op.arg("padding")
    if any(op.symbols.depends(a) for a in amounts):
        raise Refusal(
            "its padding is computed from the feature map's size (TensorFlow-style 'same' padding, or padding to "
            "match another branch), so a tile would be padded differently from the image; use a fixed padding"
        )
    amounts = [int(a) for a in amounts]
    mode = _PAD_MODES[op.func.overloadpacket.__name__]
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)]
    dims = [tensor.dim() - 1 - i for i in range(len(pairs))]
    windows = [Window(pad_lo=lo, pad_hi=hi, pad_mode=mode) for lo, hi in pairs]
    return _windowed(op, tensor, value, dims, windows, lambda i, n: n + pairs[i][0] + pairs[i][1], channel_dim=None)


@_register("_pad_circular")
def _circular(op: Op) -> Any:
    raise Refusal("circular padding wraps the far border of the image around; use zeros, reflect or replicate")


@_register("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(op: Op) -> Any:
    tensor, value = _first(op)
    shuffle = op.func.overloadpacket.__name__ == "pixel_shuffle"
    factor = int(op.arg("upscale_factor") if shuffle else op.arg("downscale_factor"))
    window = Spread(factor, factor) if shuffle else Window(factor, factor, divisor=factor)
    channels = int(op.symbols.hint(tensor.shape[-3]))
    # Channels move between depth and space: dimension -3 changes size.
    out_channels = channels // factor**2 if shuffle else channels * factor**2
    dims = [tensor.dim() - 2, tensor.dim() - 1]
    return _windowed(
        op, tensor, value, dims, [window, window], lambda i, n: window.output_length(n), out_channels, tensor.dim() - 3
    )


@_register("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
           "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_nearest_exact1d",
           "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa",
           "_upsample_bicubic2d_aa", size_aware=True)  # fmt: skip
def _upsample(op: Op) -> Any:
    raise Refusal(
        f"it calls {op.name} directly; resize through torch.nn.functional.interpolate or nn.Upsample with "
        "scale_factor (or size= another feature map's size) so streaming can follow the scale"
    )


@_register("im2col", "col2im", "unfold", "fold")
def _unfold(op: Op) -> Any:
    tensor, value = op.spatial[0]
    if op.func.overloadpacket.__name__ == "unfold" and is_feature(value.layout[_dim(op.arg("dimension"), tensor.dim())]):
        out = op.call()
        return op.emit(out, value.node, value.layout + ((),), value.extents)
    raise Refusal(f"it unfolds the feature map into patches ({op.name}); use a convolution, or move it to the head")


@_register("copy_")
def _copy_(op: Op) -> Any:
    target, source = op.arg("self"), op.arg("src")
    source_value = op.value(source)
    if op.value(target) is not None or target._base is not None or source_value is None:
        raise Refusal("it writes into (part of) a feature map in place; build the result out of place instead")
    out = op.call()
    if tuple(out.shape) != tuple(source.shape):
        raise Refusal("it copies a feature map into a tensor of another shape")
    return op.emit(out, source_value.node, source_value.layout, source_value.extents)


@_register("fill_", "zero_")
def _overwrite(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    raise Refusal("it overwrites a feature map in place with a constant")


@_register("_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2")
def _data_dependent(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    raise Refusal(
        f"it reads values of the feature map to decide what to compute ({op.name}: .item(), bool(x), nonzero, "
        "masked_select); a tile sees other values than the image; move it to the head"
    )


@_register("as_strided", "as_strided_", "as_strided_copy")
def _as_strided(op: Op) -> Any:
    if not op.spatial:
        return _constant(op)
    raise Refusal("it views the feature map with explicit strides (as_strided), which streaming cannot follow")


# ---------------------------------------------------------------- above ATen: functions


def _interpolate(tracer: Tracer, args: tuple, kwargs: dict) -> Tensor:
    """``F.interpolate`` (and ``nn.Upsample``): integer factors (or their inverses, for
    nearest and linear), ``align_corners=False``, sizes given by a scale or by another
    feature map of the trunk."""
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    tensor = bound["input"]
    value = tracer.value(tensor)
    mode = bound.get("mode", "nearest")
    modes = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear", "bilinear": "linear",
             "trilinear": "linear", "bicubic": "cubic"}  # fmt: skip
    if mode not in modes:
        raise Refusal(f"interpolation mode {mode!r} averages regions whose size depends on the image; use avg_pool")
    if bound.get("align_corners"):
        raise Refusal(
            "align_corners=True places samples relative to the image's size, which differs for a tile; use "
            "align_corners=False"
        )
    if bound.get("antialias"):
        raise Refusal("antialias=True is not supported for streaming; use antialias=False")
    count = tensor.dim() - 2
    dims = list(range(2, 2 + count))
    symbols = tracer.symbols
    size, scale = bound.get("size"), bound.get("scale_factor")
    windows, ties, tied_extents = [], [], {}
    for i, dim in enumerate(dims):
        d = spatial_dim(value.layout[dim])
        if d is None:
            raise Refusal(f"it interpolates dimension {dim} of layout {describe(value.layout)}, which is not spatial")
        length = value.extents[d]
        tie = None
        if size is not None:
            target = size[i] if isinstance(size, (list, tuple)) else size
            if not symbols.depends(target):
                raise Refusal(
                    f"it resizes to an absolute size ({target}); a tile needs a size relative to its own (use "
                    "scale_factor=, or size= another feature map's size)"
                )
            expression = symbols.expression(target)
            if expression.free_symbols == length.free_symbols:
                ratio = Fraction(symbols.hint(expression)) / Fraction(symbols.hint(length))
            elif len(expression.free_symbols) == 1 and expression.is_Symbol:
                owner_node, owner_dim = symbols.owner[expression]
                if owner_dim != d:
                    raise Refusal("it resizes a spatial dimension to the size of another one")
                ratio = Fraction(symbols.hint(expression), symbols.hint(length))
                tie = owner_node
                tied_extents[d] = expression
            else:
                raise Refusal(f"it resizes to a size computed from a spatial size ({expression}); use scale_factor=")
        else:
            factor = scale[i] if isinstance(scale, (list, tuple)) else scale
            ratio = Fraction(float(factor)).limit_denominator(64)
            if float(ratio) != float(factor):
                raise Refusal(f"its scale factor {factor} is not an integer or the inverse of one")
        if ratio.numerator != 1 and ratio.denominator != 1:
            raise Refusal(f"it resizes by {ratio}, which is not an integer factor or the inverse of one")
        if ratio.denominator > 1 and (modes[mode] == "cubic" or ratio.denominator & (ratio.denominator - 1)):
            raise Refusal(
                f"it downsamples by {ratio.denominator} with mode {mode!r}; streaming follows downsampling by powers "
                "of two with nearest or linear modes (or use avg_pool/max_pool)"
            )
        if modes[mode] == "nearest" and ratio.denominator == 1:
            windows.append(Spread(ratio.numerator, ratio.numerator))
        else:
            windows.append(Resample(ratio.numerator, ratio.denominator, modes[mode]))
        ties.append((d, tie))
    per_spatial = {spatial_dim(value.layout[dim]): w for dim, w in zip(dims, windows)}
    tie_of = dict(ties)
    node_ties = tuple(tie_of.get(d) for d in range(tracer.spatial_dims)) if any(t for _, t in ties) else ()
    node = tracer.add_node((value.node,), tuple(per_spatial.get(d) for d in range(tracer.spatial_dims)), node_ties)
    fresh = tracer.fresh_extents(node, [d for d in per_spatial if d not in tied_extents])
    extents = dict(value.extents)
    extents.update({d: symbols.expression(s) for d, s in fresh.items()})
    extents.update(tied_extents)
    shape = list(tensor.shape)
    for dim in dims:
        d = spatial_dim(value.layout[dim])
        shape[dim] = fresh[d] if d in fresh else _symint(tracer, tied_extents[d], d)
    out = tensor.new_empty(shape)
    return tracer.track(out, node, value.layout, extents)


def _symint(tracer: Tracer, expression: Any, d: int) -> Any:
    node, _ = tracer.symbols.owner[expression]
    return tracer.symbols.env.create_symintnode(expression, hint=int(tracer.symbols.hints[expression]))


def _pad_function(tracer: Tracer, args: tuple, kwargs: dict) -> Any:
    names = ("input", "pad", "mode", "value")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("mode", "constant") == "circular":
        raise Refusal("circular padding wraps the far border of the image around; use zeros, reflect or replicate")
    return F.pad(*args, **kwargs)


FUNCTION_RULES: dict[Any, Callable[[Tracer, tuple, dict], Any]] = {
    F.interpolate: _interpolate,
    F.pad: _pad_function,
}
