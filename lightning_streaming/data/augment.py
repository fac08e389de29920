"""Augmentations as lazy views: crop or white padding, flips and 90-degree rotations, and
colour jitter, each applied to whatever region is read, so they work the same on an image
read whole and on a slide streamed tile by tile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..core import RegionSource
from .source import HostRegionSource, _bounds

__all__ = ["Augmentation", "ColourJitter", "ColourSource", "Orientation", "OrientedSource", "WindowSource"]


class WindowSource(HostRegionSource):
    """A window of ``size`` at ``offset`` (``(row, col)``, may be negative or reach past
    the end) on a ``(N, C, H, W)`` source: a crop where it lies inside, ``fill`` (white)
    where it does not."""

    def __init__(self, source: RegionSource, offset: Sequence[int], size: Sequence[int], fill: int = 255) -> None:
        self.source, self.offset, self.size, self.fill = source, tuple(offset), tuple(size), fill
        if len(self.offset) != 2 or len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"WindowSource needs a 2D offset and a positive 2D size, got {offset!r}, {size!r}")
        self._shape = (*source.shape[:2], *self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def read(self, region: tuple[slice, ...]) -> Tensor:
        spans = _bounds(region, self.size)
        inner = []
        for (a, b), o, n in zip(spans, self.offset, self.source.shape[2:]):
            inner.append((max(a + o, 0), min(b + o, n)))
        if all(lo == a + o and hi == b + o for (lo, hi), (a, b), o in zip(inner, spans, self.offset)):
            return self.source.read(tuple(slice(lo, hi) for lo, hi in inner))
        out = torch.full((*self._shape[:2], *(b - a for a, b in spans)), self.fill, dtype=self.dtype)
        if all(lo < hi for lo, hi in inner):
            part = self.source.read(tuple(slice(lo, hi) for lo, hi in inner))
            index = tuple(slice(lo - o - a, hi - o - a) for (lo, hi), (a, _), o in zip(inner, spans, self.offset))
            out[(slice(None), slice(None), *index)] = part
        return out


@dataclass(frozen=True)
class Orientation:
    """One of the 8 symmetries of the square: optional transpose, then optional flips of
    rows and columns (rotation by 90 degrees is transpose then a flip)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def rotation(cls, quarter_turns: int, flip: bool = False) -> "Orientation":
        """Rotation by ``quarter_turns`` x 90 degrees counter-clockwise (as ``torch.rot90``),
        then an optional horizontal flip."""
        k = quarter_turns % 4
        o = [cls(), cls(True, True, False), cls(False, True, True), cls(True, False, True)][k]
        return cls(o.transpose, o.flip_rows, o.flip_cols ^ flip)

    def apply(self, image: Tensor) -> Tensor:
        """Apply to the last two dimensions of a tensor."""
        if self.transpose:
            image = image.transpose(-1, -2)
        dims = [d for d, f in ((-2, self.flip_rows), (-1, self.flip_cols)) if f]
        return image.flip(dims) if dims else image


class OrientedSource(HostRegionSource):
    """A ``(N, C, H, W)`` source seen through an :class:`Orientation`."""

    def __init__(self, source: RegionSource, orientation: Orientation) -> None:
        self.source, self.orientation = source, orientation
        n, c, h, w = source.shape
        self._shape = (n, c, w, h) if orientation.transpose else (n, c, h, w)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def read(self, region: tuple[slice, ...]) -> Tensor:
        (r0, r1), (c0, c1) = _bounds(region, self._shape[2:])
        h, w = self._shape[2:]
        o = self.orientation
        if o.flip_rows:
            r0, r1 = h - r1, h - r0
        if o.flip_cols:
            c0, c1 = w - c1, w - c0
        box = (slice(c0, c1), slice(r0, r1)) if o.transpose else (slice(r0, r1), slice(c0, c1))
        return o.apply(self.source.read(box)).contiguous()


@dataclass(frozen=True)
class ColourJitter:
    """Per-pixel colour changes of uint8 RGB images. Contrast pivots on mid-grey (0.5), not
    on the image's mean, so that it is the same function of a pixel wherever it is read;
    hue rotates the chroma in YIQ space. All steps are linear, so the whole change is one
    affine map (:meth:`matrix`), clipped once at the end.

    Args:
        brightness: factor on every channel (1: unchanged).
        contrast: factor on the distance from mid-grey.
        saturation: factor on the chroma (0: grey).
        hue: rotation of the chroma, in turns.

    Example::

        jittered = ls.ColourJitter(brightness=1.1, hue=0.02).apply(image_uint8)
    """

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @property
    def identity(self) -> bool:
        return (self.brightness, self.contrast, self.saturation, self.hue) == (1.0, 1.0, 1.0, 0.0)

    def matrix(self) -> tuple[list[list[float]], list[float]]:
        """The jitter as one affine map of RGB in [0, 1]: ``out = M @ rgb + b`` (all its
        steps are linear; only the final result is clipped)."""
        rgb_to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        yiq_to_rgb = np.linalg.inv(rgb_to_yiq)
        angle = 2 * np.pi * self.hue
        cos, sin = np.cos(angle) * self.saturation, np.sin(angle) * self.saturation
        chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        colour = yiq_to_rgb @ chroma @ rgb_to_yiq
        # x -> brightness * x -> contrast * (. - 0.5) + 0.5 -> colour @ .
        scale = self.contrast * self.brightness
        offset = 0.5 * (1 - self.contrast)
        matrix = colour * scale
        bias = colour @ np.full(3, offset)
        return matrix.tolist(), bias.tolist()

    def apply(self, image: Tensor) -> Tensor:
        """Jitter a ``(..., 3, *spatial)`` uint8 image; returns uint8. Each output pixel is
        the same fixed sequence of float32 operations on its own input pixel (no reduction
        across pixels), so it does not depend on the region it is read in."""
        matrix, bias = self.matrix()
        x = image.to(torch.float32)
        r, g, b = x.unbind(dim=-3)
        channels = []
        for row, offset in zip(matrix, bias):
            # in 0..255 units: M x + 255 b
            out = r * row[0]
            out += g * row[1]
            out += b * row[2]
            out += 255 * offset
            channels.append(out)
        return torch.stack(channels, dim=-3).round_().clamp_(0, 255).to(torch.uint8)


class ColourSource(HostRegionSource):
    """A uint8 ``(N, 3, H, W)`` source with :class:`ColourJitter` applied to every read."""

    def __init__(self, source: RegionSource, jitter: ColourJitter) -> None:
        if source.dtype != torch.uint8 or source.shape[1] != 3:
            raise ValueError(f"colour jitter needs a uint8 RGB source, got {source.dtype} with shape {source.shape}")
        self.source, self.jitter = source, jitter

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    def read(self, region: tuple[slice, ...]) -> Tensor:
        return self.jitter.apply(self.source.read(region))


@dataclass(frozen=True)
class Augmentation:
    """What a training sample may undergo, with the ranges the paper used kinds of: flips,
    90-degree rotations and colour jitter (crop or padding to the input size is the
    dataset's job). Colour ranges are ``factor in [1 - x, 1 + x]``, hue shift in
    ``[-hue, hue]`` turns.

    Args:
        flips: random horizontal and vertical flips.
        rotations: random rotations by multiples of 90 degrees.
        brightness, contrast, saturation: jitter amplitudes (0: off).
        hue: hue shift amplitude in turns (0: off; 0.05 is mild).

    Example::

        augmentation = ls.Augmentation(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    """

    flips: bool = True
    rotations: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"Augmentation.{name} must be in [0, 1) (a factor in [1 - x, 1 + x]), got {value!r}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"Augmentation.hue must be in [0, 0.5] turns, got {self.hue!r}")

    def sample(self, rng: np.random.Generator) -> tuple[Orientation, ColourJitter]:
        """Draw an orientation and a colour jitter (always the same number of draws)."""
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        u = rng.uniform(-1, 1, size=4)
        orientation = Orientation.rotation(turns if self.rotations else 0, flip if self.flips else False)
        if self.flips and not self.rotations and rng.integers(2):
            orientation = Orientation(orientation.transpose, not orientation.flip_rows, orientation.flip_cols)
        jitter = ColourJitter(
            1 + self.brightness * float(u[0]),
            1 + self.contrast * float(u[1]),
            1 + self.saturation * float(u[2]),
            self.hue * float(u[3]),
        )
        return orientation, jitter
