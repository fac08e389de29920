"""Where the spatial dimensions of a feature map are, whatever its shape has been made into.

A *layout* gives, for each dimension of a tensor, the *atoms* it is made of, in row-major
order: an ``int`` ``d`` is spatial dimension ``d`` of the trunk's input (unsplit), a
:class:`Feat` is ``n`` values that are the same kind of thing at every pixel (batch,
channels, groups). ``(N, C, H, W)`` is ``((Feat(N),), (Feat(C),), (0,), (1,))``; a
channels-last linear layer sees ``((Feat(N), 0, 1), (Feat(C),))`` after its reshape.

An operation is local when it treats every atom that is spatial as a set of independent
pixels (or slides a window over it); features may be mixed, split and merged freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import sympy


@dataclass(frozen=True)
class Feat:
    """``n`` feature values per pixel (batch, channels, groups)."""

    n: int


Atom = Union[int, Feat]
Dim = tuple  # tuple[Atom, ...]
Layout = tuple  # tuple[Dim, ...]


class LayoutError(Exception):
    """The operation would mix spatial positions; the text says how."""


def channels_first(batch: int, channels: int, spatial_dims: int) -> Layout:
    return (_feature_dim(batch), _feature_dim(channels)) + tuple((d,) for d in range(spatial_dims))


def _feature_dim(n: int) -> Dim:
    return () if n == 1 else (Feat(n),)


def spatial_atoms(dim: Dim) -> tuple[int, ...]:
    return tuple(a for a in dim if isinstance(a, int))


def is_feature(dim: Dim) -> bool:
    return not spatial_atoms(dim)


def spatial_dim(dim: Dim) -> int | None:
    """The spatial dimension ``dim`` is, when it is exactly one spatial atom; else None."""
    return dim[0] if len(dim) == 1 and isinstance(dim[0], int) else None


def describe(layout: Layout) -> str:
    """``(N, C, H, W)``-like text for messages: features as their sizes, spatial dims as s0, s1..."""

    def atom(a: Atom) -> str:
        return f"s{a}" if isinstance(a, int) else str(a.n)

    return "(" + ", ".join("*".join(atom(a) for a in dim) or "1" for dim in layout) + ")"


def with_feature_sizes(layout: Layout, shape: Sequence[Any]) -> Layout:
    """``layout`` with every feature-only dimension relabelled by its size in ``shape``."""
    return tuple(dim if not is_feature(dim) else _feature_dim(int(size)) for dim, size in zip(layout, shape))


def _monomial(size: Any, symbols: set) -> tuple[int, list]:
    """``size`` as ``coefficient * product of spatial symbols``; raise LayoutError otherwise."""
    if isinstance(size, int):
        return size, []
    expr = sympy.sympify(size)
    if expr.is_Integer:
        return int(expr), []
    coefficient, rest = expr.as_coeff_Mul()
    factors = sympy.Mul.make_args(rest)
    if not coefficient.is_Integer or any(f not in symbols for f in factors):
        raise LayoutError(f"it reshapes to a size ({expr}) computed from a spatial size in a way that changes it")
    return int(coefficient), list(factors)


def reshape(layout: Layout, extents: dict[int, Any], out_shape: Sequence[Any]) -> Layout:
    """The layout after a view/reshape to ``out_shape``, where ``extents`` maps each spatial
    atom to its length (a sympy symbol). Features may split and merge; a spatial atom must
    stay whole and keep its place relative to the other atoms."""
    queue: list[Atom] = [a for dim in layout for a in dim]
    symbol_of = {d: sympy.sympify(e) for d, e in extents.items()}
    spatial_of = {s: d for d, s in symbol_of.items()}
    out: list[Dim] = []
    for size in out_shape:
        coefficient, wanted = _monomial(size, set(spatial_of))
        atoms: list[Atom] = []
        while coefficient > 1 or wanted:
            while queue and queue[0] == Feat(1):
                queue.pop(0)
            if not queue:
                raise LayoutError("internal: the reshape's sizes do not cover the tensor")
            head = queue[0]
            if isinstance(head, int):
                if symbol_of[head] not in wanted:
                    raise LayoutError(
                        f"it reshapes {describe(layout)} to {tuple(out_shape)}, which splits spatial dimension {head} "
                        "or moves it past other values, mixing positions"
                    )
                wanted.remove(symbol_of[head])
                atoms.append(queue.pop(0))
                continue
            common = math.gcd(head.n, coefficient)
            if common == 1:
                raise LayoutError(
                    f"it reshapes {describe(layout)} to {tuple(out_shape)}, which moves values across a spatial "
                    "dimension, mixing positions"
                )
            atoms.append(Feat(common))
            coefficient //= common
            if head.n == common:
                queue.pop(0)
            else:
                queue[0] = Feat(head.n // common)
        out.append(_merge_features(atoms))
    if any(a != Feat(1) for a in queue):
        raise LayoutError("internal: the reshape's sizes do not cover the tensor")
    return tuple(out)


def _merge_features(atoms: list[Atom]) -> Dim:
    """Adjacent feature atoms are one feature atom."""
    merged: list[Atom] = []
    for atom in atoms:
        if isinstance(atom, Feat) and merged and isinstance(merged[-1], Feat):
            merged[-1] = Feat(merged[-1].n * atom.n)
        else:
            merged.append(atom)
    return tuple(merged)
