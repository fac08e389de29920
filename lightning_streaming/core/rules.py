"""Geometry rules: one small function per operation, looked up in a registry.

A rule receives an :class:`OpCall` (the operation, its arguments and the layout of its
spatial input) and returns an :class:`OpGeometry` (one :class:`Window` per spatial
dimension, or ``None`` for pixel-wise operations, and the output layout). It raises
:class:`Refusal` with a reason when the operation is not local; the analyser adds the
name of the module or node to the message.

Users register rules for their own modules with :func:`register_module_rule`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .window import PAD_MODES, Window

# A layout names each tensor dimension: "N" (batch), "C" (features) or the index of a
# spatial dimension (0 for the first spatial dimension of the trunk's input, ...).
Axes = tuple
Rule = Callable[["OpCall"], "OpGeometry"]


class Refusal(Exception):
    """Raised by a rule: the operation cannot be streamed exactly; the text says why."""


class SpatialArg:
    """Placeholder for an argument that is a spatial tensor (its values vary per tile)."""

    def __init__(self, axes: Axes):
        self.axes = axes

    def __repr__(self) -> str:
        return f"SpatialArg{self.axes}"


@dataclass
class OpCall:
    """One operation of the trunk as a rule sees it."""

    target: Any  # an nn.Module, a function, or a method name
    args: tuple
    kwargs: dict
    axes: Axes  # layout of the first spatial argument
    spatial_dims: int
    consts: list = field(default_factory=list)  # constant tensors among the arguments

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def require_channels_first(self, what: str) -> None:
        expected = ("N", "C") + tuple(range(self.spatial_dims))
        if tuple(self.axes) != expected:
            raise Refusal(
                f"{what} needs a channels-first (N, C, *spatial) input, but its input has layout {self.axes} "
                "(a permute before it moved the spatial dimensions)"
            )

    def dim_label(self, dim: int) -> Any:
        return self.axes[dim % len(self.axes)]


@dataclass(frozen=True)
class OpGeometry:
    windows: tuple | None  # one Window per spatial dimension; None: pixel-wise
    axes: Axes


def pixelwise(call: OpCall) -> OpGeometry:
    return OpGeometry(None, call.axes)


def _per_dim(value: Any, dims: int) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return tuple(value) * dims
        return tuple(value)
    return (value,) * dims


def _window_geometry(call: OpCall, dims: int, kernel, stride, dilation, padding, ceil_mode, pad_mode) -> OpGeometry:
    if dims != call.spatial_dims:
        raise Refusal(f"it is a {dims}D operation but the trunk's input has {call.spatial_dims} spatial dimensions")
    kernel, dilation = _per_dim(kernel, dims), _per_dim(dilation, dims)
    stride = _per_dim(kernel if stride is None or stride == [] or stride == () else stride, dims)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * dims
        else:  # "same": PyTorch puts the odd pixel on the right
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in _per_dim(padding, dims)]
    windows = tuple(
        Window(int(k), int(s), int(d), int(lo), int(hi), bool(ceil_mode), pad_mode)
        for k, s, d, (lo, hi) in zip(kernel, stride, dilation, pads)
    )
    return OpGeometry(windows, call.axes)


_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register_module_rule(module_type: type, rule: Rule | None = None) -> Any:
    """Teach the analyser the geometry of ``module_type`` (its exact type, not subclasses).

    Modules of a registered type are not traced into. ``rule(call)`` returns an
    :class:`OpGeometry`; ``call.target`` is the module instance. Usable as a decorator.
    Register a pixel-wise module with ``register_module_rule(MyAct, pixelwise)``.
    """
    if rule is None:
        return lambda r: register_module_rule(module_type, r) or r
    _MODULE_RULES[module_type] = rule
    return rule


def _register(table: dict, keys: Sequence, rule: Rule) -> Rule:
    for key in keys:
        table[key] = rule
    return rule


def module_rule(module: nn.Module) -> Rule | None:
    return _MODULE_RULES.get(type(module))


def function_rule(function: Any) -> Rule | None:
    try:
        return _FUNCTION_RULES.get(function)
    except TypeError:  # unhashable target
        return None


def method_rule(name: str) -> Rule | None:
    return _METHOD_RULES.get(name)


# ----------------------------------------------------------------------------- modules

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_PADS = {
    nn.ZeroPad1d: "zeros", nn.ZeroPad2d: "zeros", nn.ZeroPad3d: "zeros",
    nn.ConstantPad1d: "zeros", nn.ConstantPad2d: "zeros", nn.ConstantPad3d: "zeros",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
}  # fmt: skip


def _conv_module(call: OpCall) -> OpGeometry:
    conv = call.target
    call.require_channels_first(type(conv).__name__)
    if conv.padding_mode == "circular":
        raise Refusal("circular padding wraps the far border of the image around; use zeros, reflect or replicate")
    mode = conv.padding_mode if conv.padding_mode in PAD_MODES else "zeros"
    return _window_geometry(
        call, _CONV[type(conv)], conv.kernel_size, conv.stride, conv.dilation, conv.padding, False, mode
    )


def _maxpool_module(call: OpCall) -> OpGeometry:
    pool = call.target
    call.require_channels_first(type(pool).__name__)
    if pool.return_indices:
        raise Refusal("return_indices gives positions in the tile, not in the image")
    return _window_geometry(
        call, _MAXPOOL[type(pool)], pool.kernel_size, pool.stride, pool.dilation, pool.padding, pool.ceil_mode, "zeros"
    )


def _avgpool_module(call: OpCall) -> OpGeometry:
    pool = call.target
    call.require_channels_first(type(pool).__name__)
    return _window_geometry(
        call, _AVGPOOL[type(pool)], pool.kernel_size, pool.stride, 1, pool.padding, pool.ceil_mode, "zeros"
    )


def _padding_geometry(call: OpCall, padding: Sequence[int], mode: str) -> OpGeometry:
    """F.pad order: last dimension first, (left, right) pairs."""
    if mode == "circular":
        raise Refusal("circular padding wraps the far border of the image around")
    pairs = [tuple(padding[i : i + 2]) for i in range(0, len(padding), 2)]
    pad_of_dim: dict[int, tuple[int, int]] = {}
    for offset, pair in enumerate(pairs):
        label = call.axes[len(call.axes) - 1 - offset]
        if isinstance(label, int):
            pad_of_dim[label] = pair
        elif pair != (0, 0):
            raise Refusal(f"it pads the {label!r} dimension, which is not spatial")
    windows = tuple(
        Window(pad_lo=int(pad_of_dim.get(d, (0, 0))[0]), pad_hi=int(pad_of_dim.get(d, (0, 0))[1]), pad_mode=mode)
        for d in range(call.spatial_dims)
    )
    return OpGeometry(windows, call.axes)


def _pad_module(call: OpCall) -> OpGeometry:
    pad = call.target
    return _padding_geometry(call, pad.padding, _PADS[type(pad)])


def _batchnorm_module(call: OpCall) -> OpGeometry:
    bn = call.target
    if bn.training or bn.running_mean is None:
        raise Refusal(
            "BatchNorm normalises with statistics of the whole batch of images; in eval mode with running "
            "statistics it is local. Call trunk.eval() on norm layers (freeze them), move them to the head, "
            "or use StreamingLSUV initialisation instead"
        )
    return pixelwise(call)


def _instancenorm_module(call: OpCall) -> OpGeometry:
    norm = call.target
    if norm.training or not norm.track_running_stats:
        raise Refusal("InstanceNorm normalises with statistics of the whole image; move it to the head")
    return pixelwise(call)


def _groupnorm_module(call: OpCall) -> OpGeometry:
    raise Refusal("GroupNorm normalises with statistics of the whole image; move it to the head")


def _channel_norm(call: OpCall, normalized_shape: Any, what: str) -> OpGeometry:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    labels = call.axes[len(call.axes) - count :]
    if any(isinstance(label, int) for label in labels):
        raise Refusal(
            f"{what} normalises over spatial dimensions (layout {call.axes}); only per-pixel channel "
            "normalisation (channels last, ConvNeXt style) is local"
        )
    return pixelwise(call)


def _layernorm_module(call: OpCall) -> OpGeometry:
    return _channel_norm(call, call.target.normalized_shape, "LayerNorm")


def _linear_module(call: OpCall) -> OpGeometry:
    if isinstance(call.axes[-1], int):
        raise Refusal(f"it mixes the last dimension, which is spatial (layout {call.axes}); permute channels last")
    return pixelwise(call)


def _dropout_module(call: OpCall) -> OpGeometry:
    if call.target.training and call.target.p > 0:
        raise Refusal(
            "Dropout in training mode is random, so recomputed tiles would see other masks; "
            "put it in the head or set it to eval mode"
        )
    return pixelwise(call)


def _softmax_module(call: OpCall) -> OpGeometry:
    dim = call.target.dim
    if dim is None or isinstance(call.dim_label(dim), int):
        raise Refusal(f"it normalises over dimension {dim}, which is spatial or unspecified")
    return pixelwise(call)


def _adaptive_pool_module(call: OpCall) -> OpGeometry:
    size = call.target.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    if all(s is None for s in sizes):
        return pixelwise(call)
    raise Refusal(
        "adaptive (global) pooling looks at the whole feature map; put it in the head, after the streamed trunk"
    )


def _refuse_module(reason: str) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        raise Refusal(reason)

    return rule


for _types, _rule in (
    (_CONV, _conv_module),
    (_MAXPOOL, _maxpool_module),
    (_AVGPOOL, _avgpool_module),
    (_PADS, _pad_module),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _batchnorm_module),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _instancenorm_module),
    ((nn.GroupNorm,), _groupnorm_module),
    ((nn.LayerNorm,), _layernorm_module),
    ((nn.Linear, nn.Bilinear), _linear_module),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout), _dropout_module),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), _softmax_module),
    (
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
        _adaptive_pool_module,
    ),
    (
        (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
         nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
         nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink),
        pixelwise,
    ),
    ((nn.MultiheadAttention,), _refuse_module("attention mixes every position with every other; it belongs in the head")),
    ((nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), _refuse_module("circular padding wraps the far border around")),
    ((nn.Flatten, nn.Unflatten), _refuse_module("flattening mixes spatial positions into features; it belongs in the head")),
):  # fmt: skip
    _register(_MODULE_RULES, _types, _rule)


def _rrelu_module(call: OpCall) -> OpGeometry:
    if call.target.training:
        raise Refusal("RReLU in training mode draws random slopes; set it to eval mode or use LeakyReLU")
    return pixelwise(call)


_MODULE_RULES[nn.RReLU] = _rrelu_module

# --------------------------------------------------------------------------- functions


def _conv_function(dims: int) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        call.require_channels_first(f"conv{dims}d")
        weight = call.arg(1, "weight")
        if isinstance(weight, SpatialArg):
            raise Refusal("its weight is computed from the image")
        kernel = tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) else None
        if kernel is None:
            raise Refusal("its weight is not a parameter or buffer of the trunk")
        return _window_geometry(
            call, dims, kernel, call.arg(3, "stride", 1), call.arg(6, "dilation", 1),
            call.arg(4, "padding", 0), False, "zeros",
        )  # fmt: skip

    return rule


def _max_pool_function(dims: int) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        call.require_channels_first(f"max_pool{dims}d")
        if call.arg(6, "return_indices", False):
            raise Refusal("return_indices gives positions in the tile, not in the image")
        return _window_geometry(
            call, dims, call.arg(1, "kernel_size"), call.arg(2, "stride", None), call.arg(4, "dilation", 1),
            call.arg(3, "padding", 0), call.arg(5, "ceil_mode", False), "zeros",
        )  # fmt: skip

    return rule


def _avg_pool_function(dims: int) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        call.require_channels_first(f"avg_pool{dims}d")
        return _window_geometry(
            call, dims, call.arg(1, "kernel_size"), call.arg(2, "stride", None), 1,
            call.arg(3, "padding", 0), call.arg(4, "ceil_mode", False), "zeros",
        )  # fmt: skip

    return rule


def _pad_function(call: OpCall) -> OpGeometry:
    mode = call.arg(2, "mode", "constant")
    return _padding_geometry(call, call.arg(1, "pad"), "zeros" if mode == "constant" else mode)


def _dropout_function(call: OpCall) -> OpGeometry:
    if call.arg(2, "training", True) and call.arg(1, "p", 0.5) > 0:
        raise Refusal("dropout with training=True is random, so recomputed tiles would see other masks")
    return pixelwise(call)


def _batch_norm_function(call: OpCall) -> OpGeometry:
    if call.arg(5, "training", False):
        raise Refusal("batch_norm with training=True uses statistics of the whole batch of images")
    return pixelwise(call)


def _layer_norm_function(call: OpCall) -> OpGeometry:
    return _channel_norm(call, call.arg(1, "normalized_shape"), "layer_norm")


def _softmax_function(call: OpCall) -> OpGeometry:
    dim = call.arg(1, "dim")
    if dim is None or isinstance(call.dim_label(dim), int):
        raise Refusal(f"it normalises over dimension {dim}, which is spatial or unspecified")
    return pixelwise(call)


def _cat_function(call: OpCall) -> OpGeometry:
    dim = call.arg(1, "dim", 0)
    if isinstance(call.dim_label(dim), int) or call.dim_label(dim) == "N":
        raise Refusal(f"it concatenates along dimension {dim} (layout {call.axes}); only channels can be joined")
    return pixelwise(call)


def _permute(call: OpCall) -> OpGeometry:
    dims = call.args[1:] if len(call.args) > 2 else call.arg(1, "dims")
    if isinstance(dims, int):
        dims = (dims,)
    return OpGeometry(None, tuple(call.axes[d] for d in dims))


def _getitem(call: OpCall) -> OpGeometry:
    index = call.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index) or len(index) > len(call.axes):
        raise Refusal(f"indexing with {index!r} is not understood; index channels as x[:, a:b]")
    for label, i in zip(call.axes, index):
        if isinstance(i, (int, torch.Tensor, SpatialArg, list)) or i is None:
            raise Refusal(f"indexing with {index!r} changes the layout; index channels as x[:, a:b]")
        if label != "C" and i != slice(None):
            raise Refusal(f"indexing with {index!r} slices the {label!r} dimension; only channels can be sliced")
    return pixelwise(call)


def _refuse_function(reason: str) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        raise Refusal(reason)

    return rule


_POINTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, operator.abs,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.pow, torch.clamp, torch.clip, torch.relu, torch.sigmoid, torch.tanh, torch.maximum,
    torch.minimum, torch.where, torch.square, torch.erf, torch.sin, torch.cos,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, F.prelu,
    F.threshold, F.linear,
]  # fmt: skip
_register(_FUNCTION_RULES, _POINTWISE_FUNCTIONS, pixelwise)
_FUNCTION_RULES[F.linear] = _linear_module
for _d in (1, 2, 3):
    _FUNCTION_RULES[getattr(F, f"conv{_d}d")] = _conv_function(_d)
    _FUNCTION_RULES[getattr(torch, f"conv{_d}d")] = _conv_function(_d)
    _FUNCTION_RULES[getattr(F, f"max_pool{_d}d")] = _max_pool_function(_d)
    _FUNCTION_RULES[getattr(torch, f"max_pool{_d}d")] = _max_pool_function(_d)
    _FUNCTION_RULES[getattr(F, f"avg_pool{_d}d")] = _avg_pool_function(_d)
_register(_FUNCTION_RULES, (F.pad,), _pad_function)
_register(_FUNCTION_RULES, (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout), _dropout_function)
_register(_FUNCTION_RULES, (F.batch_norm,), _batch_norm_function)
_register(_FUNCTION_RULES, (F.layer_norm,), _layer_norm_function)
_register(_FUNCTION_RULES, (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), _softmax_function)
_register(_FUNCTION_RULES, (torch.cat, torch.concat), _cat_function)
_register(_FUNCTION_RULES, (torch.permute,), _permute)
_register(_FUNCTION_RULES, (operator.getitem,), _getitem)
_register(
    _FUNCTION_RULES,
    (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
     F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.mean, torch.sum, torch.amax, torch.max,
     torch.flatten, torch.reshape),
    _refuse_function("it reduces or reshapes over the whole feature map; it belongs in the head"),
)  # fmt: skip
_register(
    _FUNCTION_RULES,
    (F.scaled_dot_product_attention, F.multi_head_attention_forward, F.interpolate, F.grid_sample),
    _refuse_function("it is not a local operation with known geometry"),
)

_POINTWISE_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul", "mul_",
    "div", "div_", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "clamp", "clamp_", "clip",
    "contiguous", "float", "double", "half", "bfloat16", "to", "type_as", "square", "erf",
]  # fmt: skip
_register(_METHOD_RULES, _POINTWISE_METHODS, pixelwise)
_METHOD_RULES["permute"] = _permute
_METHOD_RULES["softmax"] = _softmax_function
_METHOD_RULES["log_softmax"] = _softmax_function
_register(
    _METHOD_RULES,
    ("mean", "sum", "amax", "max", "min", "std", "var", "flatten", "view", "reshape", "size", "norm"),
    _refuse_function("it reduces, reshapes or reads the size of the whole feature map; it belongs in the head"),
)
