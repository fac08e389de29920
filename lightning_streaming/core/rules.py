"""Rules users register for their own modules, and the types rules are written with.

Built-in operations need no rules: the analyser follows every PyTorch operator a trunk
calls (see :mod:`.tracing` and :mod:`.aten_rules`), so a module made of known operations
needs no registration. A module whose inside cannot be followed (a custom CUDA kernel, an
operator without a rule) can be described as a whole with :func:`register_module_rule`:
the analyser then runs it only for its output shape and takes its geometry from the rule.

A rule receives an :class:`OpCall` (the module, its arguments and the layout of its
spatial input) and returns an :class:`OpGeometry` (one :class:`Window` per spatial
dimension, or ``None`` for pixel-wise modules, and the output layout). It raises
:class:`Refusal` with a reason when the module is not local.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

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
    """One call of a module with a registered rule, as the rule sees it."""

    target: Any  # the nn.Module instance
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
    """The rule of a module that computes each output pixel from the same input pixel."""
    return OpGeometry(None, call.axes)


_MODULE_RULES: dict[type, Rule] = {}


def register_module_rule(module_type: type, rule: Rule | None = None) -> Any:
    """Teach the analyser the geometry of ``module_type`` as a whole.

    The rule applies to ``module_type`` and to its subclasses that do not override
    ``forward`` (parametrized copies among them). Modules of a registered type are run
    only for the shape of their output, not followed inside. ``rule(call)`` returns an
    :class:`OpGeometry`; ``call.target`` is the module instance. Usable as a decorator.
    Register a pixel-wise module with ``register_module_rule(MyAct, pixelwise)``.

    Only needed for modules the analyser cannot follow: one made of PyTorch operations
    is analysed without a rule.
    """
    if rule is None:
        return lambda r: register_module_rule(module_type, r) or r
    _MODULE_RULES[module_type] = rule
    return rule


def module_rule(module: nn.Module) -> Rule | None:
    """The registered rule of ``module``'s type or of the nearest registered base class
    whose ``forward`` it still uses."""
    if not _MODULE_RULES:
        return None
    kind = type(module)
    for cls in kind.__mro__:
        rule = _MODULE_RULES.get(cls)
        if rule is not None:
            return rule if kind.forward is cls.forward else None
    return None
