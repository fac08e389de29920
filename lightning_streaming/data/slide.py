"""Read whole-slide images (OpenSlide) and ordinary images (Pillow) at a physical spacing (um
per pixel), as uint8."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import (
    MissingSpacingError,
    RegionOutOfBoundsError,
    SlideNotFoundError,
    SlideOpenError,
    SlideReadError,
    SpacingError,
)
from .image_file import PlainImage, open_image, read_errors
from .resample import resample_area, source_span

__all__ = ["Slide", "LevelChoice", "Region"]

_BAND_BYTES = 64 * 2**20  # level pixels read at once when resampling a large region
_MPP_X, _MPP_Y = "openslide.mpp-x", "openslide.mpp-y"

#: A box as one ``slice(start, stop)`` per axis, ``(rows, cols)``, in pixels at a spacing.
Region = tuple[slice, slice]


@dataclass(frozen=True)
class LevelChoice:
    """How a spacing is read: from which pyramid level, and by how much it is resampled.

    Attributes:
        spacing: the requested spacing in um/px.
        level: the pyramid level read (the coarsest one not coarser than ``spacing``).
        ratio: level pixels per output pixel, ``(rows, cols)``; ``(1.0, 1.0)`` when the
            level's own spacing is within the tolerance (no resampling).
        size: the image size at ``spacing``, ``(height, width)``.
    """

    spacing: float
    level: int
    ratio: tuple[float, float]
    size: tuple[int, int]

    @property
    def resampled(self) -> bool:
        return self.ratio != (1.0, 1.0)


class Slide:
    """A whole-slide image read through OpenSlide (Aperio .svs, generic tiled TIFF, MIRAX,
    Hamamatsu NDPI, DICOM, ...), or an ordinary image (JPEG, PNG, TIFF without tiles, ...)
    read through Pillow, by physical spacing.

    ``read(spacing, region)`` returns uint8 RGB pixels at ``spacing`` um/px: from the
    coarsest pyramid level that is not coarser than the request, area-averaged down by
    the remaining factor (no resampling when a level's spacing is within ``tolerance``).
    Transparent pixels (outside the scanned area) come back white. A pixel's value does
    not depend on the box it is read in, so a slide streamed tile by tile is the same
    image as the slide read whole.

    The file is opened lazily and reopened in each process (DataLoader workers, DDP
    ranks), so a ``Slide`` pickles freely.

    An ordinary image is one level, decoded whole on its first read (keep it to what fits
    in memory as uint8, or convert it to a tiled pyramidal TIFF). It records no pixel size
    unless it is a TIFF with a resolution in centimetres: pass ``base_spacing`` (for an
    image without a physical scale, ``base_spacing=1`` makes spacings count in pixels:
    ``read(1)`` is full size, ``read(2)`` half).

    Args:
        path: the slide file.
        base_spacing: um/px at level 0, overriding the file's ``openslide.mpp-x`` /
            ``mpp-y``; required for files that record none. A float, or ``(y, x)``.
        tolerance: relative difference between a level's spacing and the requested one
            below which the level is used as is (default 2%: 0.499 um/px reads as 0.5).
        block_size: level pixels per side of the blocks read from OpenSlide and cached.
        cache_bytes: how many bytes of decoded blocks to keep (least recently used first out).

    Raises:
        SlideNotFoundError: the file does not exist.
        SlideOpenError: neither OpenSlide nor Pillow can open it (unsupported format, damaged
            header).

    Example::

        slide = ls.Slide("slide.svs")
        print(slide.size(8.0))                             # (height, width) at 8 um/px
        image = slide.read(8.0)                             # (3, H, W) uint8, whole slide
        patch = slide.read(2.0, (slice(0, 512), slice(100, 612)))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        base_spacing: float | Sequence[float] | None = None,
        tolerance: float = 0.02,
        block_size: int = 1024,
        cache_bytes: int = 64 * 2**20,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            where = "is a directory, not a slide file" if self.path.is_dir() else "does not exist"
            raise SlideNotFoundError(
                f"slide {str(self.path)!r} {where}; check the path (relative paths in a manifest are relative to "
                "the manifest's folder)",
                self.path,
            )
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        if block_size < 16:
            raise ValueError(f"block_size must be at least 16, got {block_size!r}")
        self.tolerance = float(tolerance)
        self.block_size = int(block_size)
        self.cache_bytes = int(cache_bytes)
        self._handle: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        handle = self._open()
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple((h, w) for w, h in handle.level_dimensions)
        self._openslide_downsamples = tuple(handle.level_downsamples)
        self.properties: dict[str, str] = dict(handle.properties)
        self.base_spacing = self._base_spacing(base_spacing)

    # -- opening -----------------------------------------------------------------------

    def _open(self) -> Any:
        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        handle = open_image(self.path)
        self._handle, self._pid = handle, os.getpid()
        self._cache.clear()
        self._cached = 0
        return handle

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_handle": None, "_pid": -1, "_cache": OrderedDict(), "_cached": 0}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the OpenSlide handle (it reopens on the next read)."""
        if self._handle is not None:
            self._handle.close()
        self._handle, self._pid = None, -1
        self._cache.clear()
        self._cached = 0

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        spacing = f"{self.base_spacing[1]:g} um/px" if self.base_spacing else "no spacing"
        h, w = self.level_dimensions[0]
        return f"Slide({str(self.path)!r}, {w}x{h} px, {spacing}, {self.level_count} levels)"

    # -- geometry ----------------------------------------------------------------------

    def _base_spacing(self, given: float | Sequence[float] | None) -> tuple[float, float] | None:
        if given is not None:
            y, x = (given, given) if isinstance(given, (int, float)) else tuple(given)
            if not (y > 0 and x > 0 and math.isfinite(y) and math.isfinite(x)):
                raise ValueError(f"base_spacing must be positive um per pixel, got {given!r}")
            return float(y), float(x)
        try:
            x = float(self.properties[_MPP_X])
            y = float(self.properties[_MPP_Y])
        except (KeyError, ValueError):
            return None
        return (y, x) if y > 0 and x > 0 else None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_spacing(self, level: int) -> tuple[float, float]:
        """um/px of a pyramid level, ``(rows, cols)``, from level 0's spacing and the level's size."""
        base = self._require_spacing()
        (h0, w0), (h, w) = self.level_dimensions[0], self.level_dimensions[level]
        return base[0] * h0 / h, base[1] * w0 / w

    def _require_spacing(self) -> tuple[float, float]:
        if self.base_spacing is None:
            if isinstance(self._open(), PlainImage):
                kind = self._open().format
                raise MissingSpacingError(
                    f"{str(self.path)!r} is an ordinary {kind} image, which records no pixel size in um, so it cannot "
                    "be read by spacing in um/px. Give the size of its pixels: Slide(path, base_spacing=0.5), or a "
                    "base_spacing column in the manifest. For an image without a physical scale, base_spacing=1 "
                    "makes spacings count in pixels (spacing 1 reads it at full size, 2 at half size)",
                    self.path,
                )
            raise MissingSpacingError(
                f"{str(self.path)!r} records no pixel spacing (no {_MPP_X} property), so it cannot be read by spacing "
                "in um/px. Pass the scanner's level-0 spacing: Slide(path, base_spacing=0.25), or a base_spacing "
                "column in the manifest",
                self.path,
            )
        return self.base_spacing

    def choose(self, spacing: float) -> LevelChoice:
        """Which level a spacing is read from, the resampling factor and the output size.

        Raises:
            ValueError: ``spacing`` is not a positive number.
            SpacingError: ``spacing`` is finer than level 0 (images are not upsampled).
            MissingSpacingError: the slide has no spacing and none was given.
        """
        if not (isinstance(spacing, (int, float)) and spacing > 0 and math.isfinite(spacing)):
            raise ValueError(f"spacing must be a positive number of um per pixel, got {spacing!r}")
        base = self._require_spacing()
        if spacing < min(base) * (1 - self.tolerance):
            raise SpacingError(
                f"spacing {spacing:g} um/px is finer than {str(self.path)!r}'s level 0 ({base[1]:g} um/px); "
                f"images are not upsampled: use a spacing of at least {base[1]:g}",
                self.path,
            )
        level = 0
        for candidate in range(self.level_count):
            sy, sx = self.level_spacing(candidate)
            if sy <= spacing * (1 + self.tolerance) and sx <= spacing * (1 + self.tolerance):
                level = candidate
        sy, sx = self.level_spacing(level)
        h, w = self.level_dimensions[level]
        if abs(spacing / sy - 1) <= self.tolerance and abs(spacing / sx - 1) <= self.tolerance:
            return LevelChoice(float(spacing), level, (1.0, 1.0), (h, w))
        ratio = (spacing / sy, spacing / sx)
        size = (max(1, math.floor(h / ratio[0])), max(1, math.floor(w / ratio[1])))
        return LevelChoice(float(spacing), level, ratio, size)

    def size(self, spacing: float) -> tuple[int, int]:
        """The image size at ``spacing`` um/px, ``(height, width)``."""
        return self.choose(spacing).size

    # -- reading -----------------------------------------------------------------------

    def read(self, spacing: float, region: Region | None = None) -> Tensor:
        """Pixels at ``spacing`` um/px as a ``(3, height, width)`` uint8 tensor.

        Args:
            spacing: um per pixel.
            region: ``(rows, cols)`` slices in pixels at ``spacing``; None for the whole
                slide. It must lie inside the slide (see :meth:`size`).

        Raises:
            RegionOutOfBoundsError: the region reaches outside the slide.
            SlideReadError: the slide's data could not be decoded.
        """
        array = self.read_array(spacing, region)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def read_array(self, spacing: float, region: Region | None = None) -> np.ndarray:
        """As :meth:`read`, as a ``(height, width, 3)`` uint8 numpy array."""
        choice = self.choose(spacing)
        (r0, r1), (c0, c1) = self._check_region(region, choice)
        if not choice.resampled:
            return self._read_level(choice.level, r0, r1, c0, c1)
        in_size = self.level_dimensions[choice.level]
        x0, x1 = source_span(c0, c1, choice.ratio[1], in_size[1])
        # Output rows in bands, so the level pixels held at once stay near _BAND_BYTES.
        band = max(1, int(_BAND_BYTES / (3 * (x1 - x0) * choice.ratio[0])))
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        for start in range(r0, r1, band):
            stop = min(r1, start + band)
            y0, y1 = source_span(start, stop, choice.ratio[0], in_size[0])
            pixels = self._read_level(choice.level, y0, y1, x0, x1)
            out[start - r0 : stop - r0] = resample_area(
                pixels, (y0, x0), (start, stop), (c0, c1), choice.ratio, in_size
            )
        return out

    def _check_region(self, region: Region | None, choice: LevelChoice) -> tuple[tuple[int, int], tuple[int, int]]:
        h, w = choice.size
        if region is None:
            return (0, h), (0, w)
        if len(region) != 2 or not all(isinstance(s, slice) and s.step in (None, 1) for s in region):
            raise TypeError(f"region must be (rows, cols) as two slices with step 1, got {region!r}")
        spans = []
        for s, n, axis in zip(region, (h, w), ("rows", "cols")):
            start, stop = s.start if s.start is not None else 0, s.stop if s.stop is not None else n
            if not (0 <= start < stop <= n):
                raise RegionOutOfBoundsError(
                    f"region {axis} {start}:{stop} is outside {str(self.path)!r}, which is {h} x {w} px (rows x cols) "
                    f"at {choice.spacing:g} um/px; regions must be non-empty and lie inside the slide (pad outside "
                    "it yourself, e.g. with white)",
                    self.path,
                )
            spans.append((int(start), int(stop)))
        return spans[0], spans[1]

    def _read_level(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Level pixels ``[r0, r1) x [c0, c1)``, assembled from fixed blocks: a pixel always
        comes from the same OpenSlide call, whatever box asked for it."""
        b = self.block_size
        out = np.empty((r1 - r0, c1 - c0, 3), dtype=np.uint8)
        for by in range(r0 // b, (r1 - 1) // b + 1):
            for bx in range(c0 // b, (c1 - 1) // b + 1):
                block = self._block(level, by, bx)
                ya, yb = max(r0, by * b), min(r1, (by + 1) * b)
                xa, xb = max(c0, bx * b), min(c1, (bx + 1) * b)
                out[ya - r0 : yb - r0, xa - c0 : xb - c0] = block[ya - by * b : yb - by * b, xa - bx * b : xb - bx * b]
        return out

    def _block(self, level: int, by: int, bx: int) -> np.ndarray:
        key = (level, by, bx)
        with self._lock:
            handle = self._open()
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            b = self.block_size
            h, w = self.level_dimensions[level]
            size = (min(b, w - bx * b), min(b, h - by * b))
            ds = self._openslide_downsamples[level]
            location = (round(bx * b * ds), round(by * b * ds))
            try:
                rgba = np.asarray(handle.read_region(location, level, size))
            except read_errors(handle) as error:
                self.close()  # OpenSlide refuses further reads on a handle after an error
                raise SlideReadError(
                    f"{str(self.path)!r}: could not decode level {level} pixels at rows {by * b}:{by * b + size[1]}, "
                    f"cols {bx * b}:{bx * b + size[0]} ({error}); the slide's image data is damaged. Re-export or "
                    "rescan it, or leave it out of the manifest",
                    self.path,
                ) from error
            block = _over_white(rgba)
            self._cache[key] = block
            self._cached += _footprint(block)
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                self._cached -= _footprint(self._cache.popitem(last=False)[1])
            return block


def _footprint(block: np.ndarray) -> int:
    return block.base.nbytes if isinstance(block.base, np.ndarray) else block.nbytes


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA over white, exactly, in integers."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min(initial=255) == 255:
        return rgb  # a view: the one copy is made when blocks are assembled
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
