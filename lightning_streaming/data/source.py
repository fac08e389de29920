"""Lazy slide inputs for the streamer: regions are read from the slide only when a tile needs them."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from ..core import RegionSource
from .layout import Layout
from .slide import Slide

__all__ = ["HostRegionSource", "SlideRegionSource", "StackedSource", "TensorSource", "read_all"]


def _bounds(region: tuple[slice, ...], shape: Sequence[int]) -> list[tuple[int, int]]:
    if len(region) != len(shape):
        raise ValueError(f"region needs one slice per spatial dimension ({len(shape)}), got {region!r}")
    spans = []
    for s, n in zip(region, shape):
        start = 0 if s.start is None else int(s.start)
        stop = n if s.stop is None else int(s.stop)
        if not 0 <= start < stop <= n or s.step not in (None, 1):
            raise ValueError(f"region {region!r} is not a non-empty box inside the spatial shape {tuple(shape)}")
        spans.append((start, stop))
    return spans


class HostRegionSource(RegionSource):
    """A :class:`~lightning_streaming.RegionSource` held on the host (CPU memory or disk):
    it reports ``device`` (cpu) and ``requires_grad`` (False) like a host tensor, so code
    that places inputs (the streaming strategies) sends its tiles to the training device."""

    device = torch.device("cpu")
    requires_grad = False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])


class SlideRegionSource(HostRegionSource):
    """One slide at one spacing, optionally cropped to its tissue (a :class:`Layout`), as a
    ``(1, 3, H, W)`` uint8 input read region by region: a slide level can be streamed
    without ever being materialised.

    Args:
        slide: a :class:`Slide` or a path.
        spacing: um per pixel.
        layout: which slide rows and columns the image shows (e.g.
            ``Layout.from_mask(...)``); None for the whole slide.

    Example::

        source = ls.SlideRegionSource("slide.svs", spacing=1.0)
        features = ls.stream(trunk, source, tile_size=2048, transform=ls.Uint8Normalize(mean, std))
    """

    def __init__(self, slide: Slide | str | os.PathLike, spacing: float, layout: Layout | None = None) -> None:
        self.slide = slide if isinstance(slide, Slide) else Slide(slide)
        self.spacing = float(spacing)
        size = self.slide.size(self.spacing)
        self.layout = layout if layout is not None else Layout.full(size)
        for runs, n, axis in ((self.layout.rows, size[0], "rows"), (self.layout.cols, size[1], "cols")):
            if runs[-1][1] > n:
                raise ValueError(
                    f"layout {axis} reach {runs[-1][1]} but {str(self.slide.path)!r} has {n} {axis} at "
                    f"{self.spacing:g} um/px; was the layout made for another spacing?"
                )
        self._shape = (1, 3, *self.layout.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def read(self, region: tuple[slice, ...]) -> Tensor:
        (r0, r1), (c0, c1) = _bounds(region, self._shape[2:])
        rows, cols = self.layout.row_pieces(r0, r1), self.layout.col_pieces(c0, c1)
        if len(rows) == 1 and len(cols) == 1:
            (_, sr, nr), (_, sc, nc) = rows[0], cols[0]
            return self.slide.read(self.spacing, (slice(sr, sr + nr), slice(sc, sc + nc)))[None]
        out = torch.empty(1, 3, r1 - r0, c1 - c0, dtype=torch.uint8)
        for ir, sr, nr in rows:
            for ic, sc, nc in cols:
                out[0, :, ir : ir + nr, ic : ic + nc] = self.slide.read(
                    self.spacing, (slice(sr, sr + nr), slice(sc, sc + nc))
                )
        return out

    def __repr__(self) -> str:
        return f"SlideRegionSource({str(self.slide.path)!r}, spacing={self.spacing:g}, shape={self._shape})"


class TensorSource(HostRegionSource):
    """A tensor ``(N, C, *spatial)`` seen as a :class:`~lightning_streaming.RegionSource`
    (for tests and for composing with the lazy augmentations)."""

    def __init__(self, tensor: Tensor) -> None:
        if tensor.dim() < 3:
            raise ValueError(f"TensorSource needs (N, C, *spatial), got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def read(self, region: tuple[slice, ...]) -> Tensor:
        _bounds(region, self.tensor.shape[2:])
        return self.tensor[(slice(None), slice(None), *region)]


class StackedSource(HostRegionSource):
    """Several sources of one shape ``(1, C, *spatial)`` as one batch ``(N, C, *spatial)``.

    Raises:
        ValueError: when the sources' shapes or dtypes differ (crop or pad them to one
            ``input_size``, or use a batch size of 1).
    """

    def __init__(self, sources: Sequence[RegionSource]) -> None:
        if not sources:
            raise ValueError("StackedSource needs at least one source")
        shapes = {(tuple(s.shape[1:]), s.dtype) for s in sources}
        if len(shapes) > 1 or any(s.shape[0] != 1 for s in sources):
            raise ValueError(
                f"cannot batch lazy inputs of different shapes {sorted(str(s) for s in shapes)}: streamed images in "
                "one batch must have one size. Set input_size (crop/pad every image to it) or use batch_size=1"
            )
        self.sources = list(sources)
        self._shape = (len(self.sources), *self.sources[0].shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.sources[0].dtype

    def read(self, region: tuple[slice, ...]) -> Tensor:
        return torch.cat([s.read(region) for s in self.sources])


def read_all(source: RegionSource, rows_per_read: int | None = None) -> Tensor:
    """Materialise a source: ``(N, C, *spatial)`` (in bands of ``rows_per_read`` rows)."""
    spatial = tuple(source.shape[2:])
    if rows_per_read is None or rows_per_read >= spatial[0]:
        return source.read(tuple(slice(0, n) for n in spatial))
    out = torch.empty(tuple(source.shape), dtype=source.dtype)
    for start in range(0, spatial[0], rows_per_read):
        stop = min(spatial[0], start + rows_per_read)
        out[:, :, start:stop] = source.read((slice(start, stop), *(slice(0, n) for n in spatial[1:])))
    return out
