"""Graph analysis: trace a trunk with torch.fx and turn it into per-dimension window arithmetic.

The result, :class:`TrunkGeometry`, answers the two questions tiling needs, for each
spatial dimension and without running the trunk: how long is the output for an input of
a given length, and which input pixels does a range of output pixels read.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from .errors import NotLocalError
from .rules import OpCall, OpGeometry, Refusal, SpatialArg, function_rule, method_rule, module_rule
from .window import Window


@dataclass(frozen=True)
class GeoNode:
    """One operation on spatial tensors: its spatial inputs and one window per dimension."""

    name: str
    inputs: tuple[int, ...]  # indices of earlier GeoNodes
    windows: tuple[Window, ...] | None  # None: pixel-wise (a merge when it has several inputs)
    strides: tuple[int, ...]  # cumulative stride per dimension, relative to the trunk's input


class _Const:
    """A value that is the same for every tile (parameters, buffers, numbers)."""

    def __init__(self, value: Any):
        self.value = value


class _Spatial:
    def __init__(self, index: int, axes: tuple):
        self.index, self.axes = index, axes


class _Tracer(fx.Tracer):
    """Treats modules with a geometry rule as leaves, traces into everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return module_rule(m) is not None or super().is_leaf_module(m, qualname)


class TrunkGeometry:
    """Window arithmetic of a traced trunk, one spatial dimension at a time."""

    def __init__(self, nodes: list[GeoNode], spatial_dims: int):
        self.nodes = nodes
        self.spatial_dims = spatial_dims
        self.output_strides = nodes[-1].strides
        # Every strided layer must see the image's grid: tiles start on multiples of this.
        self.alignment = tuple(math.lcm(*(n.strides[d] for n in nodes)) for d in range(spatial_dims))
        self.has_merges = any(len(n.inputs) > 1 for n in nodes)
        self._needed_nodes = _ancestors(nodes)

    # ------------------------------------------------------------------ lengths
    def lengths(self, dim: int, length: int) -> list[int] | None:
        """Length of every node's tensor along ``dim``; None where a merge would see
        branches of different lengths (possible for a tile, not for a valid image)."""
        out = [length]
        for node in self.nodes[1:]:
            if node.windows is None:
                first = out[node.inputs[0]]
                if any(out[i] != first for i in node.inputs[1:]):
                    return None
                out.append(first)
            else:
                out.append(node.windows[dim].output_length(out[node.inputs[0]]))
        return out

    def output_shape(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial shape of the trunk's output for an input of ``spatial_shape``."""
        shape = []
        for dim, length in enumerate(spatial_shape):
            lengths = self.lengths(dim, length)
            if lengths is None:
                raise ValueError(
                    f"an input of length {length} along spatial dimension {dim} gives branches of different lengths "
                    "at a residual addition or concatenation; the trunk itself cannot run on this size"
                )
            if min(lengths) <= 0:
                bad = self.nodes[next(i for i, n in enumerate(lengths) if n <= 0)]
                raise ValueError(
                    f"an input of length {length} along spatial dimension {dim} is too small for the trunk: "
                    f"the feature map is empty after {bad.name}"
                )
            shape.append(lengths[-1])
        return tuple(shape)

    # ------------------------------------------------------------------ receptive fields
    def needed(self, dim: int, lo: int, hi: int, lengths: list[int]) -> tuple[int, int]:
        """Input pixels (inclusive box) read by output pixels ``lo..hi`` along ``dim``,
        given the full-image ``lengths`` of every node."""
        boxes: list[tuple[int, int] | None] = [None] * len(self.nodes)
        boxes[-1] = (lo, hi)
        for index in reversed(self._needed_nodes):
            box = boxes[index]
            node = self.nodes[index]
            if box is None or index == 0:
                continue
            if node.windows is not None:
                box = node.windows[dim].input_box(box[0], box[1], lengths[node.inputs[0]])
            for source in node.inputs:
                seen = boxes[source]
                boxes[source] = box if seen is None else (min(seen[0], box[0]), max(seen[1], box[1]))
        return boxes[0]


def _ancestors(nodes: list[GeoNode]) -> list[int]:
    """Indices of the nodes the output depends on, in topological order."""
    keep = {len(nodes) - 1}
    for index in range(len(nodes) - 1, -1, -1):
        if index in keep:
            keep.update(nodes[index].inputs)
    return sorted(keep)


# ---------------------------------------------------------------------------- analysis


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        where = f"module '{node.target}' ({type(module).__name__})"
    elif node.op == "call_method":
        where = f"method '.{node.target}()' (node '{node.name}')"
    else:
        where = f"operation '{getattr(node.target, '__name__', node.target)}' (node '{node.name}')"
    frame = _user_frame(node.stack_trace or "")
    if frame:
        where += f", called at {frame}"
    return where


_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(stack_trace: str) -> str | None:
    """The innermost frame of the trace outside torch itself ("file:line: code")."""
    lines = stack_trace.strip().splitlines()
    found = None
    for head, code in zip(lines, lines[1:]):
        match = re.match(r'\s*File "(.+)", line (\d+), in', head)
        if match and not match.group(1).startswith(_TORCH_DIR):
            found = f"{match.group(1)}:{match.group(2)}: {code.strip()}"
    return found


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def _check_broadcast(axes: tuple, const: torch.Tensor) -> None:
    """A constant operand must not vary along a spatial dimension (e.g. a position embedding)."""
    if const.dim() > len(axes):
        raise Refusal(f"a constant of shape {tuple(const.shape)} adds dimensions to the feature map")
    for size, label in zip(reversed(const.shape), reversed(axes)):
        if isinstance(label, int) and size != 1:
            raise Refusal(
                f"a constant of shape {tuple(const.shape)} varies along spatial dimension {label}, "
                "so its value depends on the absolute position, not on the tile"
            )


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def _hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Users' forward hooks (feature extractors, profilers) would run on fx proxies during
    tracing and fail; they do not change geometry, so tracing runs without them."""
    saved = []
    for m in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks:
                saved.append((m, name, hooks))
                setattr(m, name, OrderedDict())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def analyse(module: nn.Module, spatial_dims: int) -> TrunkGeometry:
    """Trace ``module`` and derive its :class:`TrunkGeometry`; raise :class:`NotLocalError`
    naming the first operation that cannot be streamed exactly."""
    try:
        with _hooks_suspended(module):
            graph = _Tracer().trace(module)
    except Exception as error:  # torch.fx raises many types
        raise NotLocalError(
            f"could not trace the trunk {type(module).__name__} with torch.fx ({type(error).__name__}: {error}). "
            "Streaming analyses the trunk's graph to prove every operation is local; remove data-dependent "
            "control flow from the trunk, or register a rule for the offending module with "
            "lightning_streaming.register_module_rule"
        ) from error

    values: dict[fx.Node, Any] = {}
    nodes: list[GeoNode] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in graph.nodes:
        if node.op == "placeholder":
            if node is placeholders[0]:
                axes = ("N", "C") + tuple(range(spatial_dims))
                values[node] = _Spatial(0, axes)
                nodes.append(GeoNode("input", (), None, (1,) * spatial_dims))
            elif node.args:  # an argument with a default value
                values[node] = _Const(node.args[0])
            else:
                raise NotLocalError(
                    f"the trunk's forward takes more than one required argument ('{node.name}'); "
                    "a streamed trunk maps one image tensor to one feature map"
                )
        elif node.op == "get_attr":
            target: Any = module
            for part in node.target.split("."):
                target = getattr(target, part)
            values[node] = _Const(target)
        elif node.op == "output":
            result = node.args[0]
            out = values.get(result) if isinstance(result, fx.Node) else None
            if not isinstance(out, _Spatial):
                raise NotLocalError("the trunk must return a single feature-map tensor (N, C, *spatial)")
            if out.axes != ("N", "C") + tuple(range(spatial_dims)):
                raise NotLocalError(f"the trunk returns a tensor of layout {out.axes}; return (N, C, *spatial)")
            if out.index != len(nodes) - 1:
                # Make the returned node the last one so the output is nodes[-1].
                last = nodes[out.index]
                nodes.append(GeoNode("output", (out.index,), None, last.strides))
        else:
            values[node] = _analyse_call(node, module, values, nodes, spatial_dims)
    return TrunkGeometry(nodes, spatial_dims)


def _analyse_call(
    node: fx.Node, root: nn.Module, values: dict, nodes: list[GeoNode], spatial_dims: int
) -> Any:
    def resolve(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            value = values[arg]
            return SpatialArg(value.axes) if isinstance(value, _Spatial) else value.value
        return arg

    args = fx.node.map_aggregate(node.args, resolve)
    kwargs = fx.node.map_aggregate(node.kwargs, resolve)
    inputs = [values[n] for n in node.all_input_nodes if isinstance(values[n], _Spatial)]
    target = root.get_submodule(node.target) if node.op == "call_module" else node.target

    if not inputs:  # only constants: evaluate now, the result is a constant too
        if node.op == "call_method":
            return _Const(getattr(args[0], target)(*args[1:], **kwargs))
        return _Const(target(*args, **kwargs))

    try:
        if node.op == "call_module":
            rule = module_rule(target)
            unknown = f"{type(target).__name__} has no geometry rule"
        elif node.op == "call_method":
            rule = method_rule(target)
            unknown = f"the tensor method '.{target}()' has no geometry rule"
        else:
            rule = function_rule(target)
            unknown = f"'{getattr(target, '__name__', target)}' has no geometry rule"
        if rule is None:
            if getattr(target, "__name__", None) == "getattr":
                raise Refusal("it reads an attribute (such as .shape) of a feature map, which differs between tiles")
            raise Refusal(
                f"{unknown}, so streaming cannot prove it is local. If it is, register one with "
                "lightning_streaming.register_module_rule, or move it to the head"
            )
        axes = inputs[0].axes
        if any(i.axes != axes for i in inputs[1:]):
            raise Refusal(f"it combines feature maps of different layouts {[i.axes for i in inputs]}")
        consts = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        geometry: OpGeometry = rule(OpCall(target, args, kwargs, axes, spatial_dims, consts))
        if geometry.windows is None and node.op != "call_module":
            for const in consts:
                if const.dim() > 0:
                    _check_broadcast(geometry.axes, const)
        if geometry.windows is not None and len(inputs) > 1:
            raise Refusal("it slides a window over more than one feature map")
    except Refusal as refusal:
        raise NotLocalError(f"cannot stream {_describe(node, root)}: {refusal}") from None

    sources = tuple(dict.fromkeys(i.index for i in inputs))
    strides = [nodes[s].strides for s in sources]
    if any(s != strides[0] for s in strides[1:]):
        raise NotLocalError(
            f"cannot stream {_describe(node, root)}: it combines feature maps of different resolutions "
            f"(cumulative strides {strides})"
        )
    stride = strides[0]
    if geometry.windows is not None:
        stride = tuple(s * w.stride for s, w in zip(stride, geometry.windows))
    nodes.append(GeoNode(node.name, sources, geometry.windows, stride))
    return _Spatial(len(nodes) - 1, geometry.axes)


# ------------------------------------------------------------------------------- cache

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, TrunkGeometry]]" = weakref.WeakKeyDictionary()


def _fingerprint(module: nn.Module, spatial_dims: int) -> tuple:
    # Geometry depends on the module tree and on train/eval modes (Dropout, BatchNorm).
    return (spatial_dims,) + tuple((name, id(m), m.training) for name, m in module.named_modules())


def geometry_of(module: nn.Module, spatial_dims: int) -> TrunkGeometry:
    """:func:`analyse`, cached per module until its submodules or train/eval modes change."""
    key = _fingerprint(module, spatial_dims)
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    geometry = analyse(module, spatial_dims)
    _CACHE[module] = (key, geometry)
    return geometry
