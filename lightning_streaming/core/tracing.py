"""Analysis by meaning: run the trunk once on fake tensors with symbolic spatial sizes and
follow every PyTorch operator (ATen) it calls.

Why operators and not Python code: ``movedim``, ``permute``, ``transpose``, an einops
``rearrange`` and ``swapaxes`` all reach ATen as one permutation; ``split``, ``chunk``
and slicing as slices; ``stochastic_depth`` in eval mode as nothing at all; and a
convolution's arguments arrive in PyTorch's own signature however they were written. The
set of ATen operators a CNN uses is small and stable, so a rule per operator (in
:mod:`.aten_rules`) covers every spelling of every local network built from them.

Why symbolic sizes: a value computed from a spatial size (``h, w = x.shape[-2:]``) is a
sympy expression, so the analysis can see where it goes. Reading a rank, batch size or
channel count is always fine (they are plain ints); a spatial size may flow back into the
same spatial size (a reshape that splits or merges channels) or into a condition the tiles
can be kept consistent with; used any other way (a padding amount, a number multiplied
into the pixels, a position) the operation is refused.

Why a dispatch mode over the user's own forward, not a graph from ``torch.export`` or
``make_fx``: those must capture the whole trunk as one graph first, and fail or specialise
on what real trunks do (forward hooks that collect features, as timm's feature wrappers
do; Python branching on a shape; parametrizations; a user's module that calls C++). Here
the trunk's own Python runs unchanged and only the operators it reaches are judged, so
everything it can run on a tensor it can run on a fake one; each refusal can name the
module and the source line being executed; and the same run serves the module hooks that
map operators back to the user's modules (for messages, for the budget planner's cuts and
for layer statistics).

Each tensor the trunk computes from its input is followed by a :class:`Value`: the
geometry node it belongs to and its :mod:`layout` (which dimensions are spatial). Tensors
that are not followed are constants (parameters, buffers, numbers): the same in every tile.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import NotLocalError
from .graph import Condition, GeoNode, TrunkGeometry
from .layout import Layout, channels_first, describe, is_feature, spatial_dim
from .rules import OpCall, OpGeometry, Refusal, SpatialArg, module_rule
from .symbolic import INPUT_HINT, SizeAsNumber, SymbolTable, user_frame

log = logging.getLogger(__name__)


@dataclass
class Value:
    """What the analysis knows about a tensor computed from the trunk's input."""

    node: int
    layout: Layout
    extents: dict  # spatial dim -> sympy expression of its length in this tensor
    generation: int  # writes to the tensor's storage when this was recorded
    origin: str = ""  # the module (or operation) that made it, for messages
    root: int = 0  # id of the tensor owning its storage (the base of a view)


class TraceInputError(ValueError):
    """The input does not fit the trunk (e.g. another channel count than its first layer takes)."""

    def __init__(self, message: str, expected_channels: int | None = None):
        super().__init__(message)
        self.expected_channels = expected_channels


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Users' forward hooks (feature extractors, profilers) would run on fake tensors during
    the analysis and could keep them; they do not change geometry, so the analysis runs
    without them."""
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


@contextlib.contextmanager
def user_hooks_guarded(module: nn.Module, tracer: "Tracer") -> Iterator[None]:
    """Run the users' forward hooks during the analysis (a hook may produce the trunk's
    outputs, as timm's FeatureHookNet does), but as observers of fake tensors: what they ask
    of sizes does not bind the tiles (a profiler's ``max(numel)``), and a hook that fails on
    fake tensors (``.item()``, ``.numpy()``) is skipped with a warning."""
    saved = []
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(m, name, None)
            if hooks:
                saved.append((m, name, hooks))
                setattr(m, name, OrderedDict((key, _observer(hook, m, tracer)) for key, hook in hooks.items()))
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def _observer(hook: Any, module: nn.Module, tracer: "Tracer") -> Any:
    def observed(*args: Any, **kwargs: Any) -> Any:
        tracer.symbols.internal += 1
        failure = tracer.failure
        try:
            return hook(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a hook that only works on real tensors
            if tracer.fatal is not None:
                raise
            tracer.failure = failure  # what a hook computes for itself does not make the trunk non-local
            log.warning(
                "a forward hook of %s failed on the streaming analysis's fake tensors (%s: %s); the analysis "
                "continued without it. Streaming stays exact only if such a hook does not change the module's output",
                type(module).__name__, type(error).__name__, error,
            )  # fmt: skip
            return None
        finally:
            tracer.symbols.internal -= 1

    return observed


def default_channels(module: nn.Module) -> int:
    """The input channels of ``module``: those of its first convolution (or any first layer
    with an ``in_channels`` or ``num_features`` attribute); 3 when it has none."""
    for m in module.modules():
        for attribute in ("in_channels", "num_features"):
            value = getattr(m, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 3


def expected_spatial_dims(module: nn.Module) -> int | None:
    """Spatial dimensions of the trunk's input judged by its first 1d/2d/3d layer (None if none)."""
    for m in module.modules():
        name = type(m).__name__
        if name[-2:] in ("1d", "2d", "3d") and name[-3].isalpha():
            return int(name[-2])
    return None


class Tracer:
    """One analysis of one trunk: the modes, the module hooks and what they record."""

    def __init__(self, module: nn.Module, spatial_dims: int, channels: int, batch: int, hints: tuple | None = None):
        self.module = module
        self.input_hints = tuple(hints) if hints is not None else (INPUT_HINT,) * spatial_dims
        self.spatial_dims = spatial_dims
        self.channels, self.batch = channels, batch
        self.symbols = SymbolTable()
        self.nodes: list[GeoNode] = []
        self.node_hints: list[tuple[int, ...]] = []
        self.values: dict[int, tuple[Tensor, Value]] = {}
        self.uniform: dict[int, Tensor] = {}  # made with a spatial size, the same value at every pixel
        self.positional: dict[int, tuple[Tensor, str]] = {}  # values that are positions in the feature map
        self.generations: dict[int, int] = {}  # id of a storage's base tensor -> in-place writes to it
        self.state: dict[int, str] | None = None  # data pointers of the trunk's parameters and buffers -> names
        self.fatal: NotLocalError | None = None  # a refusal nothing may forgive
        self.module_stack: list[tuple[str, nn.Module]] = []
        self.module_nodes: dict[str, list[int]] = defaultdict(list)
        self.calls: list[str] = []
        self.opaque = 0  # > 0 inside a module with a user rule: not followed
        self.failure: Exception | None = None
        self.names = {id(m): name for name, m in module.named_modules()}

    # ------------------------------------------------------------------ followed tensors
    def value(self, tensor: Any) -> Value | None:
        if not isinstance(tensor, Tensor):
            return None
        entry = self.values.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return None
        if self.generations.get(entry[1].root, 0) != entry[1].generation:
            raise Refusal(
                "it uses a feature map after it was changed in place through another view of it "
                "(e.g. y = x[:, :2]; x.add_(...); use y); write the computation out of place"
            )
        return entry[1]

    def is_uniform(self, tensor: Any) -> bool:
        return isinstance(tensor, Tensor) and self.uniform.get(id(tensor)) is tensor

    def track(self, tensor: Tensor, node: int, layout: Layout, extents: dict, root: int | None = None) -> Tensor:
        """Record what is known of ``tensor``; ``root``: the id of the tensor owning its
        storage when it is a view made inside the analysis (PyTorch links a view to its
        base only after the operator returns)."""
        if len(layout) != tensor.dim():
            raise AssertionError(f"internal: layout {layout} for a tensor of {tensor.dim()} dimensions")
        root = id(_root(tensor)) if root is None else root
        generation = self.generations.get(root, 0)
        self.values[id(tensor)] = (tensor, Value(node, layout, dict(extents), generation, self.node_name(), root))
        return tensor

    def storage_of(self, tensor: Tensor) -> int:
        entry = self.values.get(id(tensor))
        return entry[1].root if entry is not None and entry[0] is tensor else id(_root(tensor))

    # ------------------------------------------------------------------ nodes
    def context(self) -> str:
        """Where the analysis is, for messages: the innermost module and the user's line."""
        if self.module_stack and self.module_stack[-1][0]:
            name, module = self.module_stack[-1]
            where = f"module '{name}' ({type(module).__name__})"
        else:
            where = "the trunk's forward"
        frame = user_frame()
        return f"{where}, called at {frame}" if frame else where

    def node_name(self) -> str:
        if self.module_stack and self.module_stack[-1][0]:
            name, module = self.module_stack[-1]
            return f"module '{name}' ({type(module).__name__})"
        frame = user_frame()
        return f"the operation at {frame}" if frame else "an operation in the trunk's forward"

    def add_node(self, inputs: tuple[int, ...], windows: tuple | None, ties: tuple = ()) -> int:
        """A new node computed from ``inputs`` with one window per spatial dimension (None:
        pixel-wise) and, per dimension, an optional node whose length it must equal."""
        inputs = tuple(dict.fromkeys(inputs))
        scales = [self.nodes[i].scale for i in inputs]
        if any(s != scales[0] for s in scales[1:]):
            strides = [tuple(str(1 / f) for f in s) for s in scales]
            raise Refusal(
                f"it combines feature maps of different resolutions (input pixels per pixel {strides}); branches "
                "may only be joined where their pixel grids coincide"
            )
        scale = scales[0]
        hints = self.node_hints[inputs[0]]
        if windows is not None:
            scale = tuple(s * (w.scale if w is not None else 1) for s, w in zip(scale, windows))
            hints = tuple(w.output_length(h) if w is not None else h for h, w in zip(hints, windows))
            if min(hints) <= 0:
                raise Refusal("its output is empty for an ordinary input size; it cannot be a trunk layer")
        self.nodes.append(GeoNode(self.node_name(), inputs, windows, tuple(Fraction(s) for s in scale), ties))
        self.node_hints.append(hints)
        return len(self.nodes) - 1

    def fresh_extents(self, node: int, dims: Any) -> dict[int, Any]:
        """Fresh size symbols for spatial dimensions ``dims`` of ``node``."""
        return {d: self.symbols.fresh(self.node_hints[node][d], node, d) for d in dims}

    # ------------------------------------------------------------------ running
    def run(self) -> TrunkGeometry:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode(shape_env=self.symbols.env, allow_non_fake_inputs=True)
        param = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = param.device if param is not None else torch.device("cpu")
        self.nodes.append(GeoNode("the input", (), None, (Fraction(1),) * self.spatial_dims))
        self.node_hints.append(self.input_hints)
        handles = []
        try:
            with fake:
                extents = {d: self.symbols.fresh(self.input_hints[d], 0, d) for d in range(self.spatial_dims)}
                x = torch.empty(
                    (self.batch, self.channels, *extents.values()), dtype=dtype, device=device
                )
            layout = channels_first(self.batch, self.channels, self.spatial_dims)
            self.track(x, 0, layout, {d: e.node.expr for d, e in extents.items()})
            # The users' own forward hooks run too: they are part of what the trunk computes (timm's
            # FeatureHookNet collects its outputs with them).
            with user_hooks_guarded(self.module, self):
                for m in self.module.modules():
                    handles.append(m.register_forward_pre_hook(self._pre_hook, prepend=True))
                    handles.append(m.register_forward_hook(self._post_hook))
                try:
                    with fake, _FunctionMode(self), _DispatchMode(self), torch.no_grad(), _autocast_off(device):
                        out = self.module(x)
                finally:
                    for handle in handles:
                        handle.remove()
        except (NotLocalError, TraceInputError):
            raise
        except (Refusal, SizeAsNumber) as refusal:  # raised outside an operator
            raise NotLocalError(f"cannot stream {self.context()}: {refusal}") from None
        except Exception as error:  # noqa: BLE001 - any failure of the trunk on fake tensors
            if self.fatal is not None or self.failure is not None:
                raise (self.fatal or self.failure) from None
            raise NotLocalError(_trace_failure(self.module, error)) from error
        if self.fatal is not None:
            raise self.fatal
        if self.failure is not None:  # a refusal the trunk's own code caught and ignored
            raise self.failure
        try:
            return self._geometry(out)
        except Refusal as refusal:  # e.g. max-pooling indices returned as an output
            raise NotLocalError(f"cannot stream the trunk's output{_called_at()}: {refusal}") from None

    def _geometry(self, out: Any) -> TrunkGeometry:
        leaves, spec = pytree.tree_flatten(out)
        outputs = []
        expected = "(N, C, " + ", ".join(f"s{d}" for d in range(self.spatial_dims)) + ")"
        for leaf in leaves:
            if isinstance(leaf, Tensor) and self.positional.get(id(leaf), (None,))[0] is leaf:
                raise Refusal(self.positional[id(leaf)][1])
            value = self.value(leaf) if isinstance(leaf, Tensor) else None
            if value is None:
                what = f"a tensor of shape {tuple(leaf.shape)} that does not depend on the input" if isinstance(
                    leaf, Tensor
                ) else f"{type(leaf).__name__} {leaf!r}"
                raise NotLocalError(
                    f"the trunk{_called_at()} returns {what}; a streamed trunk returns feature maps {expected} "
                    "(one tensor, or a tuple, list or dict of them)"
                )
            layout = value.layout
            channels_first_ = (
                len(layout) == self.spatial_dims + 2
                and is_feature(layout[0])
                and is_feature(layout[1])
                and all(spatial_dim(layout[2 + d]) == d for d in range(self.spatial_dims))
            )
            if any(len(dim) > 1 and not is_feature(dim) for dim in layout):
                raise NotLocalError(
                    f"the trunk{_called_at()} returns a feature map (made by {value.origin}) of layout "
                    f"{describe(layout)}, which "
                    f"merges spatial positions with other values (flattening); return {expected}, and flatten in "
                    "the head"
                )
            if not channels_first_:
                raise NotLocalError(
                    f"the trunk{_called_at()} returns a feature map (made by {value.origin}) of layout "
                    f"{describe(layout)}; return it "
                    f"as {expected} (e.g. permute a channels-last result back)"
                )
            outputs.append(value.node)
        if not outputs:
            raise NotLocalError(
                f"the trunk{_called_at()} returns {type(out).__name__} {out!r} with no feature map in it; a streamed "
                f"trunk returns feature maps {expected} (one tensor, or a tuple, list or dict of them)"
            )
        conditions = self._conditions()
        return TrunkGeometry(
            self.nodes, outputs, self.spatial_dims, conditions, spec, dict(self.module_nodes), list(self.calls)
        )

    def _conditions(self) -> list[Condition]:
        conditions = []
        for recorded in self.symbols.conditions:
            if recorded.where is None:
                continue  # evaluated inside PyTorch itself, outside any operator: its own checks
            symbols = tuple((s, self.symbols.owner[s][0]) for s in recorded.expression.free_symbols)
            dims = {self.symbols.owner[s][1] for s in recorded.expression.free_symbols}
            if len(dims) > 1:
                raise NotLocalError(
                    f"cannot stream the trunk: its code compares sizes of different spatial dimensions "
                    f"({recorded.expression}) at {recorded.where}; a tile's height and width differ from the image's"
                )
            import sympy

            expression = recorded.expression
            if isinstance(expression, sympy.Eq) and any(
                side.is_Number for side in (expression.lhs, expression.rhs)
            ) and recorded.value == sympy.true:
                raise NotLocalError(
                    f"cannot stream the trunk: its code requires a spatial size to be exactly "
                    f"{next(side for side in (expression.lhs, expression.rhs) if side.is_Number)} at {recorded.where}; "
                    "every tile has another size than the image"
                )
            conditions.append(Condition(expression, recorded.value, dims.pop(), symbols, recorded.where))
        return conditions

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module), type(module).__name__)
        self.module_stack.append((name, module))
        self.calls.append(name)
        if self.opaque:
            self.opaque += 1
        elif module_rule(module) is not None:
            self.opaque = 1

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        replaced = None
        if self.opaque:
            self.opaque -= 1
            if not self.opaque:
                with self.handling():
                    replaced = self._apply_module_rule(module, args, output)
        if replaced is not None:
            output = replaced
        name = self.module_stack.pop()[0] if self.module_stack else ""
        for leaf in pytree.tree_leaves(output):
            entry = self.values.get(id(leaf)) if isinstance(leaf, Tensor) else None
            if entry is not None and entry[0] is leaf:
                self.module_nodes[name].append(entry[1].node)
        return replaced

    def _apply_module_rule(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        rule = module_rule(module)
        assert rule is not None
        spatial = [(a, self.value(a)) for a in pytree.tree_leaves(args) if self.value(a) is not None]
        if not spatial or not isinstance(output, Tensor):
            raise Refusal("a module with a registered rule must map one feature map to one feature map")
        tensor, value = spatial[0]
        axes = _axes_of(value.layout)
        if axes is None:
            raise Refusal(f"its input has layout {describe(value.layout)}, which a module rule cannot describe")
        consts = [a for a in pytree.tree_leaves(args) if isinstance(a, Tensor) and self.value(a) is None]
        call_args = tuple(SpatialArg(axes) if a is tensor else a for a in args)
        geometry: OpGeometry = rule(OpCall(module, call_args, {}, axes, self.spatial_dims, consts))
        node = self.add_node((value.node,), geometry.windows)
        fresh = self.fresh_extents(node, range(self.spatial_dims) if geometry.windows is not None else ())
        unchanged = {spatial_dim(dim): size for dim, size in zip(value.layout, tensor.shape) if spatial_dim(dim) is not None}
        shape = []
        for size, label in zip(output.shape, geometry.axes):
            shape.append(fresh.get(label, unchanged.get(label)) if isinstance(label, int) else size)
        out = output.new_empty(shape)
        layout = tuple((label,) if isinstance(label, int) else () if size == 1 else (_feat(size),)
                       for label, size in zip(geometry.axes, output.shape))  # fmt: skip
        extents = dict(value.extents)
        extents.update({d: s.node.expr for d, s in fresh.items()})
        return self.track(out, node, layout, extents)

    # ------------------------------------------------------------------ operators
    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Run analyser code: PyTorch's checks on our symbols are its own, not the trunk's,
        and a refusal becomes a NotLocalError naming where the trunk is."""
        self.symbols.internal += 1
        try:
            yield
        except Refusal as refusal:
            error = NotLocalError(f"cannot stream {self.context()}: {refusal}")
            if self.failure is None:
                self.failure = error
            raise error from None
        except TraceInputError as mismatch:
            if self.failure is None:
                self.failure = TraceInputError(f"{self.context()} {mismatch}", mismatch.expected_channels)
            raise self.failure from None
        finally:
            self.symbols.internal -= 1

    def _check_state_write(self, tensor: Tensor) -> None:
        """Refuse a forward that writes into the trunk's own parameters or buffers: the trunk
        runs once per tile (and again in the backward), so each run would see other weights."""
        if self.state is None:
            self.state = {}
            for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
                if t is not None and t.device.type != "meta" and t.numel():
                    self.state[t.untyped_storage().data_ptr()] = name
        if _is_fake(tensor) or tensor.device.type == "meta" or not tensor.numel():
            return
        name = self.state.get(tensor.untyped_storage().data_ptr())
        if name is not None:
            from .aten_rules import NORM_STATISTICS

            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                raise Refusal(NORM_STATISTICS)  # a norm layer in training mode: its own refusal says it best
            reason = (
                f"it changes the trunk's own state during the forward (an in-place write to '{name}': a power "
                "iteration as in spectral_norm, or a running statistic, in training mode); streaming runs the trunk "
                "once per tile and again in the backward, so each run would see other weights. Set the trunk to eval "
                "mode, or move that layer to the head"
            )
            # Refused even when a forward hook does it (spectral_norm's pre-hook), which observers would forgive.
            self.fatal = self.fatal or NotLocalError(f"cannot stream {self.context()}: {reason}")
            raise Refusal(reason)

    def _positional(self, func: Any, args: tuple, kwargs: dict, reason: str) -> Any:
        """Positions (max-pooling indices) may be reshaped, but not used."""
        if func.overloadpacket.__name__ not in _SHAPE_ONLY and _returns_tensors(func):
            raise Refusal(reason)
        out = func(*args, **kwargs)
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.positional[id(tensor)] = (tensor, reason)
        return out

    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.opaque:
            with self.handling():
                return func(*args, **kwargs)
        from .aten_rules import rule_for

        with self.handling():
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor) and self.positional.get(id(leaf), (None,))[0] is leaf:
                    return self._positional(func, args, kwargs, self.positional[id(leaf)][1])
            op = Op(self, func, args, kwargs)
            op.spatial  # read what is known of the arguments before an in-place write changes it
            for index, argument in enumerate(func._schema.arguments):
                value = args[index] if index < len(args) else kwargs.get(argument.name)
                if argument.alias_info is None or not argument.alias_info.is_write or not isinstance(value, Tensor):
                    continue
                self._check_state_write(value)
                # An in-place write makes every other view of the same storage out of date.
                root = self.storage_of(value)
                self.generations[root] = self.generations.get(root, 0) + 1
            return rule_for(func)(op)


_SHAPE_ONLY = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "alias", "detach",
               "clone", "_to_copy", "expand", "t"}  # fmt: skip


def _called_at() -> str:
    frame = user_frame()
    return f" (called at {frame})" if frame else ""


def _check_signature(module: nn.Module) -> None:
    """A streamed trunk maps one image tensor to feature maps: one required argument."""
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return
    required = [
        p.name for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # fmt: skip
    if len(required) > 1:
        raise NotLocalError(
            f"the trunk's forward takes more than one required argument ({', '.join(required)}); a streamed trunk "
            "maps one image tensor to its feature maps"
        )


def _is_fake(tensor: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _returns_tensors(func: Any) -> bool:
    return any("Tensor" in str(r.type) for r in func._schema.returns)


def _size_with(symbols: SymbolTable, tensor: Tensor, value: Value, d: int, fallback: Any) -> Any:
    """The SymInt size of spatial dimension ``d`` in ``tensor`` (when its hint equals ``fallback``'s)."""
    for size, dim in zip(tensor.shape, value.layout):
        if spatial_dim(dim) == d:
            return size if symbols.hint(size) == symbols.hint(fallback) else fallback
    return fallback


def _root(tensor: Tensor) -> Tensor:
    while tensor._base is not None:
        tensor = tensor._base
    return tensor


def _feat(size: Any) -> Any:
    from .layout import Feat

    return Feat(int(size))


def _axes_of(layout: Layout) -> tuple | None:
    """The (N, C, 0, 1, ...) axes a module rule sees, or None for merged dimensions."""
    axes: list[Any] = []
    for index, dim in enumerate(layout):
        if is_feature(dim):
            axes.append("N" if index == 0 else "C")
        elif spatial_dim(dim) is not None:
            axes.append(spatial_dim(dim))
        else:
            return None
    return tuple(axes)


def _trace_failure(module: nn.Module, error: Exception) -> str:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(error, (DataDependentOutputException, DynamicOutputShapeException)):
        return (
            f"cannot stream the trunk {type(module).__name__}: its code depends on the values of a feature map "
            f"(data-dependent control flow or output size, {type(error).__name__}: {error}); a tile sees other "
            "values than the image. Move that part to the head"
        )
    frame = None
    for entry in reversed(_traceback_frames(error)):
        frame = entry
        break
    where = f" at {frame}" if frame else ""
    return (
        f"could not analyse the trunk {type(module).__name__}: running it on a symbolic input failed{where} "
        f"({type(error).__name__}: {error}). Streaming runs the trunk once on fake tensors whose spatial sizes are "
        "symbols to prove every operation is local; check that the trunk runs on inputs of this channel count and "
        "any spatial size (forward hooks run too, on fake tensors), or register a rule for the offending module with "
        "lightning_streaming.register_module_rule"
    )


def _traceback_frames(error: Exception) -> list[str]:
    import os
    import traceback

    from .symbolic import _PACKAGE_DIR, _TORCH_DIR

    frames = []
    for frame in traceback.extract_tb(error.__traceback__):
        filename = os.path.abspath(frame.filename)
        if not filename.startswith(_TORCH_DIR) and not filename.startswith(_PACKAGE_DIR):
            frames.append(f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}")
    return frames


@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        yield


class Op:
    """One operator call on followed tensors, as a rule in :mod:`.aten_rules` sees it."""

    __slots__ = ("tracer", "func", "args", "kwargs", "_bound", "_spatial")

    def __init__(self, tracer: Tracer, func: Any, args: tuple, kwargs: dict):
        self.tracer, self.func, self.args, self.kwargs = tracer, func, args, kwargs
        self._bound: dict[str, Any] | None = None
        self._spatial: list[tuple[Tensor, Value]] | None = None

    @property
    def name(self) -> str:
        return str(self.func.overloadpacket)

    def arg(self, name: str, default: Any = None) -> Any:
        """An argument by its name in PyTorch's own signature of the operator."""
        if self._bound is None:
            bound: dict[str, Any] = {}
            schema = self.func._schema.arguments
            for argument, value in zip(schema, self.args):
                bound[argument.name] = value
            bound.update(self.kwargs)
            for argument in schema:
                if argument.name not in bound and argument.has_default_value():
                    bound[argument.name] = argument.default_value
            self._bound = bound
        return self._bound.get(name, default)

    @property
    def spatial(self) -> list[tuple[Tensor, Value]]:
        """The followed tensors among the arguments, in order."""
        if self._spatial is None:
            found = []
            for leaf in pytree.tree_leaves((self.args, self.kwargs)):
                value = self.tracer.value(leaf)
                if value is not None:
                    found.append((leaf, value))
            self._spatial = found
        return self._spatial

    def value(self, tensor: Any) -> Value | None:
        """What is known of argument ``tensor`` (as it was when the operator was called)."""
        for candidate, value in self.spatial:
            if candidate is tensor:
                return value
        return None

    @property
    def symbols(self) -> SymbolTable:
        return self.tracer.symbols

    def call(self, aligned: bool = False) -> Any:
        """Run the operator on the fake tensors (PyTorch's own shape rules). With
        ``aligned``, feature maps that meet here are first viewed with the size symbols of
        the first one: their lengths are equal by the planner's checks, which PyTorch's
        kernels cannot see from two different symbols."""
        if not aligned or len(self.spatial) < 2:
            return self.func(*self.args, **self.kwargs)
        first_tensor, first = self.spatial[0]
        replacements = {}
        for tensor, value in self.spatial[1:]:
            if tensor is first_tensor or value.extents == first.extents:
                continue
            sizes = list(tensor.shape)
            for index, dim in enumerate(value.layout):
                d = spatial_dim(dim)
                if d is not None and d in first.extents:
                    sizes[index] = _size_with(self.tracer.symbols, first_tensor, first, d, sizes[index])
            replacements[id(tensor)] = torch.ops.aten.as_strided.default(
                tensor, sizes, list(tensor.stride()), tensor.storage_offset()
            )
        args, kwargs = pytree.tree_map_only(
            Tensor, lambda t: replacements.get(id(t), t), (self.args, self.kwargs)
        )
        return self.func(*args, **kwargs)

    def emit(self, out: Tensor, node: int, layout: Layout, extents: dict) -> Tensor:
        return self.tracer.track(out, node, layout, extents, self._aliased_storage())

    def _aliased_storage(self) -> int | None:
        """The storage the operator's result shares (a view, or the target of an in-place
        operator), from PyTorch's alias annotations; None for a new tensor."""
        if not any(r.alias_info is not None for r in self.func._schema.returns):
            return None
        for argument, value in zip(self.func._schema.arguments, self.args):
            if argument.alias_info is not None and isinstance(value, Tensor):
                return self.tracer.storage_of(value)
        return None

    def merged_node(self, values: list[Value] | None = None) -> int:
        """The node of a pixel-wise result of ``values`` (default: every followed argument)."""
        values = [v for _, v in self.spatial] if values is None else values
        nodes = tuple(dict.fromkeys(v.node for v in values))
        if len(nodes) == 1:
            return nodes[0]
        return self.tracer.add_node(nodes, None)


Rule = Callable[[Op], Any]


class _DispatchMode:
    """A TorchDispatchMode that hands every operator to the tracer (defined lazily below)."""

    def __new__(cls, tracer: Tracer) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                return tracer.dispatch(func, args, kwargs or {})

        return Mode()


class _FunctionMode:
    """A TorchFunctionMode for the few functions analysed above ATen (``F.interpolate``,
    whose Python code would turn symbolic sizes into numbers)."""

    def __new__(cls, tracer: Tracer) -> Any:
        from torch.overrides import TorchFunctionMode

        from .aten_rules import FUNCTION_RULES

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                rule = FUNCTION_RULES.get(func)
                if rule is not None and not tracer.opaque:
                    with tracer.handling():
                        if any(tracer.value(a) is not None for a in pytree.tree_leaves(args)):
                            return rule(tracer, args, kwargs)
                return func(*args, **kwargs)

        return Mode()


def analyse(
    module: nn.Module, spatial_dims: int, channels: int, batch: int | None = None, hints: tuple | None = None
) -> TrunkGeometry:
    """Analyse ``module`` for inputs ``(batch, channels, *spatial_dims sizes)``; raise
    :class:`NotLocalError` naming the first operation that cannot be streamed exactly.

    ``hints`` are the example spatial sizes the trunk's own conditions on sizes are
    evaluated at (default: a large size divisible by common strides)."""
    _check_signature(module)
    return Tracer(module, spatial_dims, channels, batch if batch is not None else 2, hints).run()
