"""The one rule for reading a classification manifest's labels, so that a typo cannot
silently change the task.

- A label is a class name (``tumour``) or a class index (``0``, ``1``, ...). Numbers are
  compared as numbers: ``1``, ``1.0`` and ``01`` are the same label.
- With ``classes=[...]`` (names in index order): a label equal to a name is that class; a
  number equal to a numeric name is that class; when no name is a number, a whole number
  ``0 <= i < len(classes)`` is class ``i``. Any other label is a bad row.
- With ``num_classes=k``: labels are the whole numbers ``0 .. k-1``.
- With neither, the manifest decides: whole numbers give classes ``0 .. max``, and every
  index in between must occur; names give their sorted list, and names that differ only in
  case are refused. A manifest mixing numbers and names is refused. Every refusal lists the
  labels with their row counts and says how to state the task (``classes=`` or
  ``num_classes=``).
- A stated class that no row uses is warned about (with the counts).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from .errors import ManifestError

__all__ = ["class_index", "declared_classes", "infer_classes", "warn_absent_classes"]

log = logging.getLogger(__name__)


def as_number(label: str) -> float | None:
    """The label as a finite number, or None when it is a name."""
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _canonical(label: str) -> str:
    """Numbers in one spelling (``1.0`` -> ``1``), names as written."""
    value = as_number(label)
    return str(int(value)) if value is not None and value.is_integer() else label


def describe(labels: Sequence[tuple[int, str]], *, limit: int = 12) -> str:
    """``'0' (40 rows), '1' (2 rows: lines 7, 19)``: each label with its row count (and the
    lines of rare ones, where a typo usually is)."""
    lines: dict[str, list[int]] = {}
    for line, label in labels:
        lines.setdefault(_canonical(label), []).append(line)
    parts = []
    for label, where in sorted(lines.items(), key=lambda item: (as_number(item[0]) is None, _sort_key(item[0]))):
        count = f"{len(where)} row{'s' if len(where) > 1 else ''}"
        if len(where) <= 3:
            count += f": line{'s' if len(where) > 1 else ''} {', '.join(map(str, where))}"
        parts.append(f"{label!r} ({count})")
    more = f", ... ({len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _sort_key(label: str) -> tuple:
    value = as_number(label)
    return (value, "") if value is not None else (math.inf, label)


def declared_classes(classes: Sequence[str] | None, num_classes: int | None) -> tuple[str, ...] | None:
    """The class names stated by ``classes=`` or ``num_classes=`` (``("0", ..., "k-1")``)."""
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes={list(classes)} names {len(classes)} classes but num_classes={num_classes}")
    if classes is not None:
        names = tuple(str(c).strip() for c in classes)
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"classes must be distinct non-empty names in index order, got {list(classes)}")
        return names
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        return tuple(str(i) for i in range(num_classes))
    return None


def infer_classes(path: Path, labels: Sequence[tuple[int, str]]) -> tuple[str, ...]:
    """The classes a manifest's labels (``(line, label)``, empty ones left out) imply, by the
    rule above; raises :class:`ManifestError` where they are ambiguous."""
    if not labels:
        return ()
    numbers = {label: as_number(label) for _, label in labels}
    listing = describe(labels)
    how = (
        "State the task explicitly: classes=['normal', 'tumour', ...] (names in index order; numbers are then "
        "read as indices) or num_classes=k (labels 0 .. k-1)"
    )
    if any(v is None for v in numbers.values()) and any(v is not None for v in numbers.values()):
        raise ManifestError(f"manifest {str(path)!r} mixes numbers and names as labels: {listing}. {how}", path)
    if all(v is None for v in numbers.values()):
        names = sorted(set(numbers))
        folded = Counter(name.casefold() for name in names)
        clashes = [name for name in names if folded[name.casefold()] > 1]
        if clashes:
            raise ManifestError(
                f"manifest {str(path)!r} has labels that differ only in case: {clashes} ({listing}). Fix the typo, "
                f"or, if they are different classes, pass classes={names}",
                path,
            )
        return tuple(names)
    values = [v for v in numbers.values() if v is not None]
    if not all(v.is_integer() and v >= 0 for v in values):
        raise ManifestError(
            f"manifest {str(path)!r}: classification labels must be class indices 0, 1, 2, ... or names, got "
            f"{listing}. For numeric targets use task='regression'",
            path,
        )
    present = {int(v) for v in values}
    missing = sorted(set(range(max(present) + 1)) - present)
    if missing:
        raise ManifestError(
            f"manifest {str(path)!r}: integer labels skip class(es) {missing}: {listing}, which would make "
            f"{max(present) + 1} classes. If those classes exist but have no rows here, pass "
            f"num_classes={max(present) + 1}; otherwise renumber the labels 0 .. {len(present) - 1}, or pass "
            "classes=[...]",
            path,
        )
    return tuple(str(i) for i in range(max(present) + 1))


def class_index(label: str, classes: Sequence[str]) -> int | None:
    """The index of ``label`` among ``classes`` by the rule above; None when it is not one."""
    if label in classes:
        return list(classes).index(label)
    value = as_number(label)
    if value is None:
        return None
    numeric = [as_number(name) for name in classes]
    if any(v is not None for v in numeric):
        matches = [i for i, v in enumerate(numeric) if v == value]
        return matches[0] if len(matches) == 1 else None
    return int(value) if value.is_integer() and 0 <= value < len(classes) else None


def warn_absent_classes(path: Path, classes: Sequence[str], labels: Sequence[tuple[int, str]]) -> None:
    """Warn when stated classes have no row in this manifest (naming the label counts)."""
    used = {class_index(label, classes) for _, label in labels}
    absent = [name for i, name in enumerate(classes) if i not in used]
    if absent and labels:
        log.warning(
            "manifest %s has no rows of class(es) %s among the stated classes %s; its labels: %s",
            path, absent, list(classes), describe(labels),
        )  # fmt: skip
