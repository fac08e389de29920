"""CSV manifests: one slide per row with its target (a class, several labels, or numbers)."""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from .errors import LabelParseError, ManifestError, SlideNotFoundError
from .labels import class_index, declared_classes, infer_classes, warn_absent_classes
from .policy import OnError, check_on_error

__all__ = ["Manifest", "ManifestRow", "Task"]

log = logging.getLogger(__name__)

Task = Literal["classification", "multilabel", "regression"]
_TASKS = ("classification", "multilabel", "regression")
_OPTIONAL = ("base_spacing", "tissue_mask")


@dataclass(frozen=True)
class ManifestRow:
    """One usable row: the slide, its target, where it came from.

    Attributes:
        slide: absolute path of the slide.
        target: an int class index (classification), a float tensor of 0/1 per label
            (multilabel) or a float tensor of values (regression); None in a manifest
            without targets (read with ``require_targets=False``, e.g. slides to predict).
        line: the row's line number in the CSV (for messages).
        base_spacing: level-0 um/px from a ``base_spacing`` column, if any.
        tissue_mask: a saved :class:`TissueMask` (``.npz``) from a ``tissue_mask`` column,
            used instead of detecting tissue, if any.
    """

    slide: Path
    target: int | Tensor | None
    line: int
    base_spacing: float | None = None
    tissue_mask: Path | None = None


@dataclass
class Manifest:
    """A CSV file listing slides and targets, parsed and checked.

    The CSV has a header. ``slide_column`` (default ``slide``) holds the slide path,
    absolute or relative to the CSV's folder. The target columns (default: every other
    column except ``base_spacing`` and ``tissue_mask``) hold:

    - ``classification``: one column, a class index (``0``, ``1``, ...) or a class name,
      read by one rule (:mod:`lightning_streaming.data.labels`): numbers compared as
      numbers (``1.0`` is ``1``); without ``classes`` or ``num_classes``, names give their
      sorted list and indices ``0 .. max``, while a column mixing numbers and names, or
      whose indices skip a class, is refused with the labels and their counts;
    - ``multilabel``: one 0/1 column per label;
    - ``regression``: one or more numbers.

    An optional ``base_spacing`` column gives level-0 um/px for slides that record none;
    an optional ``tissue_mask`` column names a mask saved with :meth:`TissueMask.save`
    (e.g. edited by hand, or from annotations) to use instead of tissue detection.

    Problems (a missing slide file, a target that does not parse, an unknown class) are
    collected with their line numbers. With ``on_error="raise"`` the first ten are raised
    together; with ``"skip"`` each is logged as a warning, the row is left out and counted
    in ``excluded``.

    Args:
        path: the CSV file.
        task: ``"classification"``, ``"multilabel"`` or ``"regression"``.
        slide_column: the column holding slide paths.
        target_columns: the target columns (default: all but the slide, ``base_spacing``
            and ``tissue_mask`` columns).
        classes: class names in index order (classification); needed so that validation
            and test manifests use the training manifest's indices.
        num_classes: the number of classes, for index labels ``0 .. num_classes - 1``
            (e.g. when a class has no rows in this manifest). Give this or ``classes``.
        on_error: ``"raise"`` or ``"skip"``.
        require_targets: False accepts a manifest with no target column (just ``slide``,
            and optionally ``base_spacing``, ``tissue_mask``): slides to predict. Its rows
            have ``target`` None.

    Example::

        train = ls.Manifest.read("train.csv")                       # slide,label
        unlabelled = ls.Manifest.read("new_slides.csv", require_targets=False)   # slide
        val = ls.Manifest.read("val.csv", classes=train.classes)
    """

    path: Path
    task: Task
    rows: list[ManifestRow]
    target_columns: tuple[str, ...]
    classes: tuple[str, ...] | None = None
    excluded: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        """Classes (classification) or labels (multilabel); None for regression."""
        if self.task == "multilabel":
            return len(self.target_columns)
        if self.task == "classification":
            return len(self.classes or ())
        return None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def read(
        cls,
        path: str | os.PathLike,
        *,
        task: Task = "classification",
        slide_column: str = "slide",
        target_columns: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        on_error: OnError = "raise",
        check_files: bool = True,
        require_targets: bool = True,
    ) -> "Manifest":
        check_on_error(on_error)
        stated = declared_classes(classes, num_classes)
        if stated is not None and task != "classification":
            raise ValueError(f"classes= and num_classes= are for task='classification', not {task!r}")
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        path = Path(path)
        if not path.is_file():
            raise SlideNotFoundError(f"manifest {str(path)!r} does not exist", path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                records = [(reader.line_num, record) for record in reader]
        except (csv.Error, UnicodeDecodeError) as error:
            raise ManifestError(f"manifest {str(path)!r} is not a readable CSV file: {error}", path) from error
        if slide_column not in header:
            raise ManifestError(
                f"manifest {str(path)!r} has no {slide_column!r} column (columns: {header}); name the slide-path "
                "column 'slide' or pass slide_column=",
                path,
            )
        if target_columns is None:
            target_columns = [c for c in header if c not in (slide_column, *_OPTIONAL)]
        missing = [c for c in target_columns if c not in header]
        classes = stated
        if target_columns or require_targets:
            classes = _check_targets(path, header, records, list(target_columns), missing, task, stated)
        rows, problems = [], []
        for line, record in records:
            try:
                row = _parse_row(path, line, record, slide_column, list(target_columns), task, classes, check_files)
                rows.append(row)
            except (LabelParseError, SlideNotFoundError) as error:
                problems.append(error)
        return cls._checked(path, task, rows, tuple(target_columns), classes, problems, on_error)

    @classmethod
    def _checked(
        cls,
        path: Path,
        task: Task,
        rows: list[ManifestRow],
        target_columns: tuple[str, ...],
        classes: tuple[str, ...] | None,
        problems: list[Exception],
        on_error: OnError,
    ) -> "Manifest":
        if problems and on_error == "raise":
            shown = "\n  ".join(str(p) for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            labels = any(isinstance(p, LabelParseError) for p in problems)
            error_type = LabelParseError if labels else SlideNotFoundError
            raise error_type(
                f"manifest {str(path)!r} has {len(problems)} bad row(s):\n  {shown}{more}\n"
                "Fix the rows, or pass on_error='skip' to leave them out (each is logged and counted)",
                path,
            )
        for problem in problems:
            log.warning("skipping manifest row: %s", problem)
        if not rows:
            raise ManifestError(f"manifest {str(path)!r} has no usable rows", path)
        return cls(path, task, rows, target_columns, classes, [str(p) for p in problems])


def _check_targets(
    path: Path,
    header: list[str],
    records: list[tuple[int, dict[str, str | None]]],
    target_columns: list[str],
    missing: list[str],
    task: Task,
    stated: tuple[str, ...] | None,
) -> tuple[str, ...] | None:
    """Refuse missing or unsuitable target columns; the classes of a classification manifest."""
    if missing or not target_columns:
        hint = "; to list slides without targets (for prediction), read it with require_targets=False"
        raise ManifestError(
            f"manifest {str(path)!r}: target columns {missing or '(none)'} not found among {header}"
            + ("" if missing else hint),
            path,
        )
    if task == "classification" and len(target_columns) != 1:
        raise ManifestError(
            f"manifest {str(path)!r}: classification takes one target column, got {list(target_columns)}; pass "
            "target_columns=['label'], or task='multilabel' for one 0/1 column per label",
            path,
        )
    if task != "classification":
        return stated
    labels = [(line, (r.get(target_columns[0]) or "").strip()) for line, r in records]
    labels = [(line, label) for line, label in labels if label]
    if stated is None:
        return infer_classes(path, labels)
    warn_absent_classes(path, stated, labels)
    return stated


def _parse_row(
    path: Path,
    line: int,
    record: dict[str, str | None],
    slide_column: str,
    target_columns: list[str],
    task: Task,
    classes: tuple[str, ...] | None,
    check_files: bool,
) -> ManifestRow:
    where = f"{path}:{line}"
    slide_text = (record.get(slide_column) or "").strip()
    if not slide_text:
        raise LabelParseError(f"{where}: empty {slide_column!r}", path)
    slide = Path(slide_text).expanduser()
    slide = slide if slide.is_absolute() else (path.parent / slide)
    if check_files and not slide.is_file():
        raise SlideNotFoundError(f"{where}: slide {str(slide)!r} does not exist", slide)
    values = [(c, (record.get(c) or "").strip()) for c in target_columns]
    target: int | Tensor | None
    if not target_columns:
        target = None
    elif task == "classification":
        column, value = values[0]
        index = class_index(value, classes or ())
        if index is None:
            expected = f"one of {list(classes)}" if classes else "a class index 0, 1, ... or a class name"
            raise LabelParseError(f"{where}: {column}={value!r} is not {expected}", path)
        target = index
    else:
        numbers = []
        for column, value in values:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or (task == "multilabel" and number not in (0.0, 1.0)):
                expected = "0 or 1" if task == "multilabel" else "a finite number"
                raise LabelParseError(f"{where}: {column}={value!r} is not {expected}", path)
            numbers.append(number)
        target = torch.tensor(numbers, dtype=torch.float32)
    spacing_text = (record.get("base_spacing") or "").strip()
    base_spacing = None
    if spacing_text:
        try:
            base_spacing = float(spacing_text)
        except ValueError:
            base_spacing = math.nan
        if not (math.isfinite(base_spacing) and base_spacing > 0):
            raise LabelParseError(f"{where}: base_spacing={spacing_text!r} is not a positive number (um/px)", path)
    mask_text = (record.get("tissue_mask") or "").strip()
    mask = None
    if mask_text:
        mask = Path(mask_text).expanduser()
        mask = mask if mask.is_absolute() else path.parent / mask
        if check_files and not mask.is_file():
            raise SlideNotFoundError(f"{where}: tissue mask {str(mask)!r} does not exist", mask)
        mask = mask.resolve()
    return ManifestRow(slide.resolve(), target, line, base_spacing, mask)
