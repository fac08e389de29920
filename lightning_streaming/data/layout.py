"""Which part of a slide an image shows: the tissue bounding box, optionally with empty
rows and columns removed, as runs of slide pixels per axis."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .tissue import TissueMask

__all__ = ["Layout", "Run"]

#: ``(start, stop)`` in slide pixels at the layout's spacing.
Run = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """An image assembled from runs of slide rows and columns: image row ``i`` is the
    ``i``-th slide row counted along the runs in ``rows`` (likewise for columns).

    One run per axis is a plain crop (the tissue bounding box); several runs remove the
    empty rows and columns between them, compacting the tissue.

    Attributes:
        rows: runs of slide rows, ascending and disjoint.
        cols: runs of slide columns, ascending and disjoint.

    Example::

        layout = ls.Layout.from_mask(mask, spacing=2.0, size=slide.size(2.0), remove_empty=True)
        print(layout.shape)
    """

    rows: tuple[Run, ...]
    cols: tuple[Run, ...]

    def __post_init__(self) -> None:
        for name, runs in (("rows", self.rows), ("cols", self.cols)):
            if not runs:
                raise ValueError(f"a Layout needs at least one run of {name}")
            for (a, b), (c, _) in zip(runs, runs[1:] + ((None, None),)):  # type: ignore[operator]
                if not (0 <= a < b) or (c is not None and c < b):
                    raise ValueError(f"Layout {name} must be ascending, disjoint, non-empty runs; got {runs}")

    @classmethod
    def full(cls, size: tuple[int, int]) -> "Layout":
        """The whole slide, ``size = (height, width)``."""
        return cls(((0, size[0]),), ((0, size[1]),))

    @classmethod
    def from_mask(
        cls, mask: TissueMask, spacing: float, size: tuple[int, int], *, remove_empty: bool = False, margin: int = 1
    ) -> "Layout":
        """The tissue of ``mask`` at ``spacing`` for a slide of ``size`` there.

        Args:
            mask: the tissue mask (any spacing).
            spacing: um/px of the image.
            size: the slide's ``(height, width)`` at ``spacing``.
            remove_empty: also drop the rows and columns without tissue between tissue
                parts (compaction), keeping ``margin`` mask pixels around each part.
            margin: mask pixels of background kept around tissue when ``remove_empty``.

        Returns the whole slide when the mask holds no tissue (nothing is dropped silently:
        check ``mask.empty`` to treat that case otherwise).
        """
        box = mask.bounding_box(spacing, size)
        if box is None:
            return cls.full(size)
        if not remove_empty:
            return cls(((box[0].start, box[0].stop),), ((box[1].start, box[1].stop),))
        axes = []
        for axis in (0, 1):
            runs = [mask.to_pixels(a, b, spacing, size[axis]) for a, b in mask.runs(axis, margin)]
            merged: list[list[int]] = []
            for a, b in runs:
                if a >= b:
                    continue
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            axes.append(tuple((a, b) for a, b in merged))
        return cls(axes[0], axes[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the assembled image."""
        return sum(b - a for a, b in self.rows), sum(b - a for a, b in self.cols)

    @staticmethod
    def _pieces(runs: tuple[Run, ...], start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(image_start, slide_start, length)`` pieces covering image ``[start, stop)``."""
        pieces, offset = [], 0
        for a, b in runs:
            lo, hi = max(start, offset), min(stop, offset + b - a)
            if lo < hi:
                pieces.append((lo - start, a + lo - offset, hi - lo))
            offset += b - a
        return pieces

    def row_pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        return self._pieces(self.rows, start, stop)

    def col_pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        return self._pieces(self.cols, start, stop)

    def to_image(self, row: int, col: int) -> tuple[int, int] | None:
        """Image coordinates of slide pixel ``(row, col)``; None when it was removed."""
        out = []
        for runs, value in ((self.rows, row), (self.cols, col)):
            starts = [a for a, _ in runs]
            i = bisect.bisect_right(starts, value) - 1
            if i < 0 or value >= runs[i][1]:
                return None
            out.append(sum(b - a for a, b in runs[:i]) + value - runs[i][0])
        return out[0], out[1]
