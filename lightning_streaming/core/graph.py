"""The geometry of a trunk: per-dimension window arithmetic over its graph of local operations.

:class:`TrunkGeometry` answers the questions tiling needs, for each spatial dimension and
without running the trunk: how long is every feature map (and every output) for an input
of a given length, does the trunk accept that length, and which input pixels does a set of
output pixels read. It is built by :mod:`.tracing` and cached per trunk structure here.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import torch
from torch import nn

from .window import IDENTITY


@dataclass(frozen=True)
class GeoNode:
    """One feature map: the nodes it is computed from and, per spatial dimension, the window
    of the operation that made it (``None``: pixel-wise, or a merge of several inputs)."""

    name: str  # for messages: "module 'layer1.0.conv1' (Conv2d)"
    inputs: tuple[int, ...]
    windows: tuple | None
    scale: tuple[Fraction, ...]  # output pixels per input pixel of the trunk, per dimension
    ties: tuple = ()  # per dimension: a node whose length this node's must equal, or None


@dataclass(frozen=True)
class Condition:
    """A condition on one spatial dimension's sizes that the trunk's own code evaluated
    (``if x.shape[-1] % 2``, an equality of two branches' sizes): every tile, like the
    image, must give it the value it had when the trunk was analysed."""

    expression: Any  # sympy expression over node size symbols
    expected: Any  # its value at analysis time
    dim: int
    symbols: tuple  # ((sympy symbol, node index), ...)
    where: str

    def holds(self, lengths: list[int]) -> bool:
        import sympy

        values = {symbol: sympy.Integer(lengths[node]) for symbol, node in self.symbols}
        return bool(self.expression.xreplace(values) == self.expected)


@dataclass
class TrunkGeometry:
    """Window arithmetic of an analysed trunk, one spatial dimension at a time."""

    nodes: list[GeoNode]
    outputs: list[int]  # node index of each (flattened) output
    spatial_dims: int
    conditions: list[Condition] = field(default_factory=list)
    output_spec: Any = None  # torch.utils._pytree spec of the trunk's return value
    module_nodes: dict[str, list[int]] = field(default_factory=dict)  # submodule -> nodes of its outputs
    calls: list[str] = field(default_factory=list)  # submodules in the order they ran

    def __post_init__(self) -> None:
        self._needed_nodes = _ancestors(self.nodes, self.outputs)
        # Every tile starts where each feature map's grid has a whole pixel.
        self.alignment = tuple(
            math.lcm(*(self.nodes[i].scale[d].denominator for i in self._needed_nodes))
            for d in range(self.spatial_dims)
        )
        self.output_scales = [self.nodes[i].scale for i in self.outputs]
        self._cache: dict = {}

    @property
    def output_strides(self) -> tuple:
        """Input pixels per output pixel of the first output (compatibility)."""
        return tuple(1 / s for s in self.output_scales[0])

    def truncated(self, node: int) -> "TrunkGeometry":
        """The trunk up to ``node`` (everything computed before it, in the order the trunk
        runs), with ``node`` as its one output: the geometry of an intermediate layer."""
        conditions = [c for c in self.conditions if all(n <= node for _, n in c.symbols)]
        return TrunkGeometry(self.nodes[: node + 1], [node], self.spatial_dims, conditions, None)

    # ------------------------------------------------------------------ lengths
    def lengths(self, dim: int, length: int) -> list[int] | None:
        """Length of every node's feature map along ``dim`` for an input of ``length``; None
        where the trunk cannot run on it (branches of different lengths meet, a length an
        operation refuses, an empty feature map, or a condition of the trunk's code that
        would take another path)."""
        key = (dim, length)
        if key in self._cache:
            return self._cache[key]
        out = [length]
        valid = length > 0
        for node in self.nodes[1:]:
            if node.windows is None or node.windows[dim] is None:
                first = out[node.inputs[0]]
                if any(out[i] != first for i in node.inputs[1:]):
                    valid = False
                value = first
            else:
                value = node.windows[dim].output_length(out[node.inputs[0]])
            if value <= 0:
                valid = False
            if node.ties and node.ties[dim] is not None and out[node.ties[dim]] != value:
                valid = False
            out.append(max(value, 0))
        if valid and any(c.dim == dim and not c.holds(out) for c in self.conditions):
            valid = False
        result = out if valid else None
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = result
        return result

    def why_invalid(self, dim: int, length: int) -> str:
        """Why an input of ``length`` along ``dim`` cannot run (for messages)."""
        out = [length]
        for node in self.nodes[1:]:
            if node.windows is None or node.windows[dim] is None:
                first = out[node.inputs[0]]
                if any(out[i] != first for i in node.inputs[1:]):
                    return (
                        f"branches of lengths {[out[i] for i in node.inputs]} meet at {node.name}, "
                        "which needs equal lengths"
                    )
                value = first
            else:
                value = node.windows[dim].output_length(out[node.inputs[0]])
                if value < 0:
                    return f"{node.name} does not accept a feature map of length {out[node.inputs[0]]}"
            if value <= 0:
                return f"the feature map is empty after {node.name}"
            if node.ties and node.ties[dim] is not None and out[node.ties[dim]] != value:
                return (
                    f"{node.name} resizes to the length of another feature map ({out[node.ties[dim]]}), "
                    f"which is not an exact multiple here ({value})"
                )
            out.append(value)
        for condition in self.conditions:
            if condition.dim == dim and not condition.holds(out):
                return f"the trunk's code takes another path for this size ({condition.where})"
        return "it is valid"

    def output_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shape of every output for an input of ``spatial_shape``."""
        per_dim = []
        for dim, length in enumerate(spatial_shape):
            lengths = self.lengths(dim, length)
            if lengths is None:
                smallest = self.smallest_length(dim)
                hint = f" (the smallest length it accepts is {smallest})" if smallest and smallest > length else ""
                raise ValueError(
                    f"the trunk cannot run on an input of length {length} along spatial dimension {dim}: "
                    f"{self.why_invalid(dim, length)}{hint}"
                )
            per_dim.append(lengths)
        return [tuple(lengths[node] for lengths in per_dim) for node in self.outputs]

    def output_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return self.output_shapes(spatial_shape)[0]

    def smallest_length(self, dim: int, limit: int = 1 << 16) -> int | None:
        """The smallest input length along ``dim`` the trunk accepts (None if none up to ``limit``)."""
        length = 1
        while length <= limit:
            if self.lengths(dim, length) is not None:
                return length
            length += 1 if length < 64 else length // 16
        return None

    # ------------------------------------------------------------------ receptive fields
    def needed(self, dim: int, boxes: dict[int, tuple[int, int]], lengths: list[int]) -> tuple[int, int] | None:
        """Input pixels (inclusive box) read by the given output boxes (node -> inclusive
        box) along ``dim``, given the full-image ``lengths`` of every node."""
        found: list[tuple[int, int] | None] = [None] * len(self.nodes)
        for node, box in boxes.items():
            found[node] = _union(found[node], box)
        for index in reversed(self._needed_nodes):
            box = found[index]
            if box is None or index == 0:
                continue
            node = self.nodes[index]
            if node.windows is not None and node.windows[dim] is not None:
                box = node.windows[dim].input_box(box[0], box[1], lengths[node.inputs[0]])
                if box[0] > box[1]:
                    continue
            for source in node.inputs:
                found[source] = _union(found[source], box)
        return found[0]


def _union(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def _ancestors(nodes: list[GeoNode], outputs: Sequence[int]) -> list[int]:
    """Indices of the nodes the outputs depend on, in topological order."""
    keep = set(outputs)
    for index in range(len(nodes) - 1, -1, -1):
        if index in keep:
            keep.update(nodes[index].inputs)
            for tie in nodes[index].ties:
                if tie is not None:
                    keep.add(tie)
    return sorted(keep)


def identity_windows(spatial_dims: int) -> tuple:
    return (IDENTITY,) * spatial_dims


# ------------------------------------------------------------------------------- cache

_MAX_STRUCTURES = 64
_BY_STRUCTURE: "OrderedDict[tuple, TrunkGeometry]" = OrderedDict()
_BY_MODULE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, TrunkGeometry]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _attribute_key(value: Any, depth: int = 0) -> Any:
    """A hashable stand-in for a module attribute that may change what ``forward`` computes."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)) and depth < 3:
        return (type(value).__name__,) + tuple(_attribute_key(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return ("dict",) + tuple(sorted((str(k), _attribute_key(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    # Functions and other objects: the same object is the same computation; another is not.
    return (type(value).__qualname__, id(value))


def structure_key(module: nn.Module) -> tuple:
    """Everything about ``module`` that its geometry can depend on: the module tree, each
    module's type, mode and plain attributes, and its parameter and buffer shapes."""
    parts = []
    for name, m in module.named_modules():
        attributes = tuple(
            (k, _attribute_key(v)) for k, v in sorted(vars(m).items()) if not k.startswith("_") and k != "training"
        )
        tensors = tuple((n, tuple(t.shape)) for n, t in m.named_parameters(recurse=False))
        tensors += tuple((n, tuple(t.shape) if t is not None else None) for n, t in m.named_buffers(recurse=False))
        parts.append((name, type(m), m.training, attributes, tensors))
    return tuple(parts)


def geometry_of(
    module: nn.Module,
    spatial_dims: int,
    channels: int | None = None,
    batch: int | None = None,
    hints: tuple[int, ...] | None = None,
) -> TrunkGeometry:
    """The :class:`TrunkGeometry` of ``module`` for inputs with ``spatial_dims`` spatial
    dimensions and ``channels`` channels (default: the ``in_channels`` of its first
    convolution), analysed once per trunk structure and cached. ``hints``: example input
    sizes at which the trunk's own conditions on sizes are taken (see :func:`.tracing.analyse`).

    Raises :class:`~lightning_streaming.NotLocalError` naming the first operation that
    cannot be streamed exactly.
    """
    from .tracing import analyse, default_channels

    if channels is None:
        channels = default_channels(module)
    key = (structure_key(module), spatial_dims, channels, batch, hints)
    with _LOCK:
        cached = _BY_MODULE.get(module)
        if cached is not None and key in cached:
            return cached[key]
        geometry = _BY_STRUCTURE.get(key)
        if geometry is not None:
            _BY_STRUCTURE.move_to_end(key)
    if geometry is None:
        geometry = analyse(module, spatial_dims, channels, batch, hints)
        with _LOCK:
            _BY_STRUCTURE[key] = geometry
            if len(_BY_STRUCTURE) > _MAX_STRUCTURES:
                _BY_STRUCTURE.popitem(last=False)
    with _LOCK:
        per_module = _BY_MODULE.setdefault(module, {})
        if len(per_module) > 8:
            per_module.clear()
        per_module[key] = geometry
    return geometry
