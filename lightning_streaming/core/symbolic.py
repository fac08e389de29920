"""Spatial sizes as symbols: fresh size symbols for feature maps, and every condition a
trunk's code evaluates on them.

The analysis runs the trunk on fake tensors whose spatial sizes are sympy symbols (through
PyTorch's own ``ShapeEnv``), so it can tell a value computed from a spatial size from a
constant. Each feature map made by a windowed operation gets a fresh symbol per spatial
dimension; its length is then known by window arithmetic, not by algebra. Conditions that
Python code evaluates on these symbols (``if h % 2``, ``assert h == w``) are answered from
the symbols' example values and recorded, so the planner can keep tiles on the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import linecache
import os
import sys
import traceback
from typing import Any

import sympy
import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep
# Example value of every spatial input size: large, and divisible by the strides of common
# networks (8! = 2^7 * 3^2 * 5 * 7), so that a trunk meant for ordinary images takes its
# ordinary path; small enough that 3D volumes do not overflow element counts.
INPUT_HINT = 40320


def user_frame(skip_package: bool = True) -> str | None:
    """The innermost frame of the current stack outside PyTorch (and this package), as
    ``"file:line: code"``."""
    for frame in reversed(traceback.extract_stack()):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_TORCH_DIR) or (skip_package and filename.startswith(_PACKAGE_DIR)):
            continue
        if filename.startswith(_STDLIB_DIR) and "site-packages" not in filename:
            continue
        if filename.startswith("<"):  # generated code, e.g. a dataclass's __init__
            continue
        return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


# PyTorch's machinery for symbolic values, between a Python condition and our evaluation.
_MACHINERY = (
    os.path.join(_TORCH_DIR, "fx", "experimental", ""),
    os.path.join(_TORCH_DIR, "utils", "_sympy", ""),
    os.path.join(_TORCH_DIR, "__init__.py"),  # SymInt and SymBool are defined there
)


_SYM_TYPES_FILE = os.path.join(_TORCH_DIR, "__init__.py")  # SymInt.__bool__ and friends live there


def _condition_site(boolean: bool) -> str | None:
    """Where the question being answered comes from: ``"file:line: code"`` when it is the
    trunk's own code (or a library it uses), None when it is PyTorch's own checks.

    A condition (``if h % 2``) counts when Python evaluated it (through ``SymBool.__bool__``);
    a conversion to a number (``int(h)``, ``torch.linspace(0, 1, h)``) counts when the code
    that asked is not PyTorch's (its kernels convert sizes for their own bookkeeping)."""
    frame = sys._getframe(2)
    from_python = False
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        from_python = from_python or filename == _SYM_TYPES_FILE
        # The analyser's own pass-through frames (its function mode) are transparent too.
        if not filename.startswith(_MACHINERY) and not filename.startswith(_PACKAGE_DIR):
            break
        frame = frame.f_back
    if frame is None or os.path.abspath(frame.f_code.co_filename).startswith(_TORCH_DIR):
        return None
    if boolean and not from_python:
        return None
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {line}"


def _source_class() -> type:
    """A ``torch._guards.Source`` naming a size symbol, written against either shape of the
    ``Source`` API (``name`` a method in older PyTorch, a property in newer)."""
    from torch._guards import GuardSource, Source

    def static(attribute: str) -> Any:
        return inspect.getattr_static(Source, attribute, None)

    namespace: dict[str, Any] = {"__annotations__": {"label": str}, "__module__": __name__}
    if isinstance(static("name"), (property, functools.cached_property)):
        namespace["name"] = property(lambda self: self.label)
        namespace["_name_template"] = property(lambda self: self.label)
    else:
        namespace["name"] = lambda self: self.label
    if isinstance(static("guard_source"), (property, functools.cached_property)):
        namespace["guard_source"] = property(lambda self: GuardSource.CONSTANT)
    else:
        namespace["guard_source"] = lambda self: GuardSource.CONSTANT
    return dataclasses.dataclass(frozen=True)(type("SizeSource", (Source,), namespace))


_SOURCE: type | None = None


class SizeAsNumber(Exception):
    """The trunk turned a spatial size into a plain number (the text says where)."""


@dataclasses.dataclass
class RecordedCondition:
    expression: Any
    value: Any
    where: str | None


class SymbolTable:
    """A ``ShapeEnv`` whose symbols are feature-map sizes, each with an example value (hint)
    and the node and spatial dimension it measures."""

    def __init__(self) -> None:
        global _SOURCE
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        if _SOURCE is None:
            _SOURCE = _source_class()
        self.env = ShapeEnv()
        self.hints: dict[sympy.Symbol, sympy.Integer] = {}
        self.owner: dict[sympy.Symbol, tuple[int, int]] = {}  # symbol -> (node, spatial dim)
        self.conditions: list[RecordedCondition] = []
        self.internal = 0  # > 0 while PyTorch's own kernels run on the analyser's behalf
        self._count = 0
        self.env.evaluate_expr = self._evaluate_expr  # answer every question about our symbols ourselves

    def fresh(self, hint: int, node: int, dim: int) -> torch.SymInt:
        """A new size symbol for spatial dimension ``dim`` of ``node``, with example value ``hint``."""
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        self._count += 1
        symbol = self.env.create_symbol(
            int(hint), _SOURCE(f"size{self._count}"), dynamic_dim=DimDynamic.DYNAMIC  # type: ignore[misc]
        )
        self.hints[symbol] = sympy.Integer(int(hint))
        self.owner[symbol] = (node, dim)
        return self.env.create_symintnode(symbol, hint=int(hint))

    def expression(self, value: Any) -> Any:
        """The sympy expression of an int or SymInt/SymFloat/SymBool."""
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return value.node.expr
        return sympy.sympify(value)

    def depends(self, value: Any) -> bool:
        """Whether ``value`` (an int, a Sym value, or a sympy expression) involves a spatial size."""
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            value = value.node.expr
        elif not isinstance(value, sympy.Basic):
            return False
        return bool(value.free_symbols & self.hints.keys())

    def hint(self, value: Any) -> Any:
        """The example value of ``value`` (an int, a Sym value or a sympy expression)."""
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            value = value.node.expr
        if not isinstance(value, sympy.Basic):
            return value
        result = value.xreplace(self.hints)
        if result.is_Integer:
            return int(result)
        if result.is_Number:
            return float(result)
        return bool(result)

    def _evaluate_expr(self, expression: Any, hint: Any = None, fx_node: Any = None, *args: Any, **kwargs: Any) -> Any:
        value = expression.xreplace(self.hints)
        if not self.internal and expression.free_symbols & self.hints.keys():
            boolean = isinstance(value, sympy.logic.boolalg.BooleanAtom)
            site = _condition_site(boolean)
            if not boolean and site is not None:
                # int(h), float(h), range(h), torch.linspace(..., h): the size becomes a plain number.
                raise SizeAsNumber(
                    f"it converts a spatial size to a number at {site}; every tile has another size than the image, "
                    "so use the size only to reshape the same feature map, or move this to the head"
                )
            if site is not None:
                self.conditions.append(RecordedCondition(expression, value, site))
        return value
