"""Heatmap grids over a slide, and pooling of per-pixel values (or a coarser feature grid)
onto them, one block at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["HeatmapGrid", "Pooler", "Pooling"]

Pooling = Literal["mean", "max"]


@dataclass(frozen=True)
class HeatmapGrid:
    """A heatmap's pixels over a slide: heatmap pixel ``(p, q)`` covers the slide's pixels
    (at ``source_spacing``) ``[p * factor, (p + 1) * factor)`` by ``[q * factor, (q + 1) * factor)``.

    Attributes:
        shape: ``(height, width)`` of the heatmap.
        spacing: um per heatmap pixel.
        source_spacing: um per pixel of the image the heatmap is computed from.
        factor: image pixels per heatmap pixel (``spacing / source_spacing``, at least 1).
        to_level0: level-0 slide pixels per heatmap pixel, ``(rows, cols)``: a viewer's
            coordinates of heatmap pixel ``(p, q)`` are ``(q * to_level0[1], p * to_level0[0])``.
    """

    shape: tuple[int, int]
    spacing: float
    source_spacing: float
    factor: float
    to_level0: tuple[float, float]

    @classmethod
    def covering(
        cls, size: tuple[int, int], source_spacing: float, spacing: float, level0_per_pixel: tuple[float, float]
    ) -> "HeatmapGrid":
        """The grid at ``spacing`` over an image of ``size`` pixels at ``source_spacing``,
        whose pixels are ``level0_per_pixel`` level-0 pixels each."""
        if not (spacing >= source_spacing * (1 - 1e-9)):
            raise ValueError(
                f"heatmap_spacing {spacing:g} um/px is finer than the prediction's spacing {source_spacing:g} um/px: "
                "a heatmap cannot show more than the input pixels. Use a heatmap_spacing of at least "
                f"{source_spacing:g}"
            )
        factor = max(1.0, spacing / source_spacing)
        shape = (max(1, math.ceil(size[0] / factor - 1e-9)), max(1, math.ceil(size[1] / factor - 1e-9)))
        to_level0 = (factor * level0_per_pixel[0], factor * level0_per_pixel[1])
        return cls(shape, float(spacing), float(source_spacing), factor, to_level0)

    def index(self, pixels: np.ndarray, axis: int) -> np.ndarray:
        """The heatmap row (``axis=0``) or column of each image pixel (by its centre); -1
        stays -1 (padding, not on the slide)."""
        out = np.floor((pixels + 0.5) / self.factor).astype(np.int64)
        out = np.minimum(out, self.shape[axis] - 1)
        return np.where(pixels >= 0, out, -1)


class Pooler:
    """Pools values given on an image's pixels into a :class:`HeatmapGrid`: each image
    pixel belongs to the heatmap pixel its centre falls in, and a heatmap pixel is the
    ``"mean"`` (or ``"max"``) of its image pixels; heatmap pixels with none are 0.

    Values arrive in blocks (:meth:`add`: any disjoint blocks, in any order, each image
    pixel once), or as a coarse grid spread evenly over the image (:meth:`add_grid`: a
    trunk's output, ``"mean"`` only).

    Args:
        grid: the heatmap's grid.
        rows, cols: the heatmap row (column) of each image row (column), or -1 for pixels
            outside the slide (padding); non-decreasing where not -1, -1 only at the ends.
        mode: ``"mean"`` or ``"max"``.
    """

    def __init__(self, grid: HeatmapGrid, rows: np.ndarray, cols: np.ndarray, mode: Pooling = "mean") -> None:
        if mode not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {mode!r}")
        for axis, index in enumerate((rows, cols)):
            valid = np.flatnonzero(index >= 0)
            if valid.size and (valid[-1] - valid[0] + 1 != valid.size or np.any(np.diff(index[valid]) < 0)):
                raise ValueError("image pixels must map to non-decreasing heatmap pixels, with -1 only at the ends")
        self.grid, self.rows, self.cols, self.mode = grid, rows, cols, mode
        self.values = np.zeros(grid.shape, dtype=np.float64)
        self.row_counts = np.bincount(rows[rows >= 0], minlength=grid.shape[0]).astype(np.float64)
        self.col_counts = np.bincount(cols[cols >= 0], minlength=grid.shape[1]).astype(np.float64)

    @staticmethod
    def _groups(index: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """``(first, stop, group starts relative to first, heatmap index of each group)`` of
        the valid part of ``index``; None when nothing is valid."""
        valid = np.flatnonzero(index >= 0)
        if valid.size == 0:
            return None
        first, stop = int(valid[0]), int(valid[-1]) + 1
        part = index[first:stop]
        starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
        return first, stop, starts, part[starts]

    def add(self, row: int, col: int, values: np.ndarray) -> None:
        """Values of the image pixels ``[row, row + h) x [col, col + w)``, shape ``(h, w)``."""
        rows = self._groups(self.rows[row : row + values.shape[0]])
        cols = self._groups(self.cols[col : col + values.shape[1]])
        if rows is None or cols is None:
            return
        block = values[rows[0] : rows[1], cols[0] : cols[1]]
        where = np.ix_(rows[3], cols[3])
        if self.mode == "mean":
            self.values[where] += np.add.reduceat(np.add.reduceat(block, rows[2], axis=0), cols[2], axis=1)
        else:
            part = np.maximum.reduceat(np.maximum.reduceat(block, rows[2], axis=0), cols[2], axis=1)
            self.values[where] = np.maximum(self.values[where], part)

    def _spread(self, axis: int, cells: int) -> np.ndarray:
        """``(heatmap pixels, cells)`` counts of image pixels that fall in both, for ``cells``
        spread evenly over the image along one axis (cell ``o`` holds pixel ``i`` when
        ``floor((i + 0.5) * cells / n) == o``)."""
        index = self.rows if axis == 0 else self.cols
        n = index.size
        cell = np.minimum(np.floor((np.arange(n) + 0.5) * cells / n).astype(np.int64), cells - 1)
        valid = index >= 0
        size = self.grid.shape[axis]
        flat = np.bincount(index[valid] * cells + cell[valid], minlength=size * cells)
        return flat.reshape(size, cells).astype(np.float64)

    def add_grid(self, values: np.ndarray) -> None:
        """A ``(h, w)`` grid spread evenly over the whole image (e.g. a trunk's output,
        whose pixel ``(o, u)`` stands for the image pixels around it)."""
        if self.mode != "mean":
            raise ValueError("a grid is pooled by its mean over each heatmap pixel; use mode='mean'")
        rows, cols = self._spread(0, values.shape[0]), self._spread(1, values.shape[1])
        self.values += rows @ values.astype(np.float64) @ cols.T

    def result(self) -> np.ndarray:
        """The heatmap, float32."""
        if self.mode == "max":
            return self.values.astype(np.float32)
        counts = np.outer(self.row_counts, self.col_counts)
        return np.divide(self.values, counts, out=np.zeros_like(self.values), where=counts > 0).astype(np.float32)
