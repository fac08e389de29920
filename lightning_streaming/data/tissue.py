"""Tissue detection on a low-resolution view of a slide: blurred grey level below a threshold."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .slide import Region, Slide

__all__ = ["TissueDetection", "TissueMask", "detect_tissue", "gaussian_blur"]


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a ``(H, W)`` float tensor (edges replicated); identity for
    ``sigma <= 0``."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    out = image[None, None]
    out = torch.nn.functional.pad(out, (radius, radius, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1))
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[0, 0]


def _otsu(values: Tensor) -> float:
    """Otsu's threshold of 0..255 values (the split maximising between-class variance)."""
    hist = torch.bincount(values.round().clamp(0, 255).to(torch.int64).flatten(), minlength=256).double()
    p = hist / hist.sum()
    omega = torch.cumsum(p, 0)
    mu = torch.cumsum(p * torch.arange(256, dtype=torch.float64), 0)
    between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    return float(torch.argmax(between)) + 0.5


def _open(mask: Tensor, radius: int) -> Tensor:
    """Morphological opening by a ``(2 radius + 1)`` square: drops parts narrower than it."""
    if radius <= 0:
        return mask
    pool = torch.nn.functional.max_pool2d
    k = 2 * radius + 1
    eroded = ~pool((~mask)[None, None].float(), k, 1, radius).bool()
    return pool(eroded.float(), k, 1, radius).bool()[0, 0] & mask


@dataclass
class TissueMask:
    """Where a slide has tissue, on a coarse grid.

    Attributes:
        mask: ``(H, W)`` bool tensor, True for tissue, at ``spacing`` um/px.
        spacing: um/px of the mask's pixels.
        threshold: the grey-level threshold used (0..255; tissue is darker).
        settings: how the mask was made (for the record, and to key caches).

    Example::

        mask = ls.detect_tissue(ls.Slide("slide.svs"), spacing=8.0)
        print(mask.fraction, mask.bounding_box(2.0))
        mask.save("slide.tissue.npz")
        mask = ls.TissueMask.load("slide.tissue.npz")
    """

    mask: Tensor
    spacing: float
    threshold: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """The fraction of the slide's area that is tissue."""
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def _scale(self, spacing: float) -> float:
        return self.spacing / spacing  # pixels at ``spacing`` per mask pixel

    def to_pixels(self, start: int, stop: int, spacing: float, size: int) -> tuple[int, int]:
        """Mask pixels ``[start, stop)`` along one axis as pixels at ``spacing``, clipped to ``size``."""
        scale = self._scale(spacing)
        return max(0, math.floor(start * scale)), min(size, math.ceil(stop * scale))

    def bounding_box(self, spacing: float, size: tuple[int, int] | None = None) -> Region | None:
        """The tissue's bounding box in pixels at ``spacing`` (``(rows, cols)`` slices),
        clipped to ``size`` when given; None when there is no tissue."""
        if self.empty:
            return None
        rows = torch.nonzero(self.mask.any(dim=1)).flatten()
        cols = torch.nonzero(self.mask.any(dim=0)).flatten()
        h, w = size if size is not None else (math.inf, math.inf)
        r = self.to_pixels(int(rows[0]), int(rows[-1]) + 1, spacing, h)  # type: ignore[arg-type]
        c = self.to_pixels(int(cols[0]), int(cols[-1]) + 1, spacing, w)  # type: ignore[arg-type]
        return slice(*r), slice(*c)

    def runs(self, axis: int, margin: int = 0) -> list[tuple[int, int]]:
        """Runs ``[start, stop)`` of mask rows (``axis=0``) or columns (``axis=1``) holding
        tissue, each widened by ``margin`` mask pixels and merged where they touch."""
        occupied = self.mask.any(dim=1 - axis).numpy()
        if margin > 0:
            padded = np.convolve(occupied.astype(np.int64), np.ones(2 * margin + 1, dtype=np.int64), mode="same")
            occupied = padded > 0
        runs: list[tuple[int, int]] = []
        start = None
        for i, value in enumerate(occupied.tolist() + [False]):
            if value and start is None:
                start = i
            elif not value and start is not None:
                runs.append((start, i))
                start = None
        return runs

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``.npz`` (the bit-packed mask and its metadata)."""
        path = Path(path)
        meta = {"spacing": self.spacing, "threshold": self.threshold, "settings": self.settings}
        mask = self.mask.numpy()
        with open(path, "wb") as f:  # np.savez would append .npz to other suffixes
            np.savez_compressed(f, bits=np.packbits(mask), shape=np.array(mask.shape), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TissueMask":
        """Load a mask written by :meth:`save`."""
        with np.load(path) as data:
            shape = tuple(int(v) for v in data["shape"])
            mask = np.unpackbits(data["bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)
            meta = json.loads(str(data["meta"]))
        return cls(torch.from_numpy(mask), float(meta["spacing"]), float(meta["threshold"]), meta["settings"])


def detect_tissue(
    slide: Slide,
    spacing: float = 8.0,
    *,
    threshold: float | str = 220.0,
    blur: float = 16.0,
    opening: float = 48.0,
    min_fraction: float = 0.0,
) -> TissueMask:
    """Find tissue on a low-resolution view: pixels whose blurred grey level is darker than
    a background threshold.

    Args:
        slide: the slide.
        spacing: um/px of the view the mask is computed on (coarse is fast; 8 to 32 suits
            H&E slides).
        threshold: grey level (0..255) below which a pixel is tissue, or ``"otsu"`` to
            choose it per slide (Otsu's method on the blurred grey levels). Glass is about
            240 in H&E scans; the default 220 keeps pale stroma.
        blur: standard deviation of the Gaussian blur in um (0: none); smooths noise and
            closes small gaps.
        opening: width in um of a morphological opening (erosion then dilation by a
            square) that removes specks of dust and debris narrower than it (0: none).
        min_fraction: a slide whose tissue fraction is below this is treated as empty (the
            mask is cleared), so dust does not count as tissue.

    Returns:
        A :class:`TissueMask` at ``spacing``.

    Example::

        mask = ls.detect_tissue(slide, spacing=16.0, threshold="otsu")
    """
    if not (isinstance(threshold, (int, float)) or threshold == "otsu"):
        raise ValueError(f"threshold must be a grey level in 0..255 or 'otsu', got {threshold!r}")
    if blur < 0:
        raise ValueError(f"blur must be a non-negative standard deviation in um, got {blur!r}")
    if opening < 0:
        raise ValueError(f"opening must be a non-negative width in um, got {opening!r}")
    image = slide.read(spacing).to(torch.float32)
    grey = gaussian_blur(image.mean(dim=0), blur / spacing)
    level = _otsu(grey) if threshold == "otsu" else float(threshold)
    mask = _open(grey < level, round(opening / spacing / 2))
    if float(mask.float().mean()) < min_fraction:
        mask = torch.zeros_like(mask)
    settings = {"threshold": threshold, "blur": blur, "opening": opening, "min_fraction": min_fraction}
    return TissueMask(mask, float(spacing), level, settings)


@dataclass(frozen=True)
class TissueDetection:
    """Settings of :func:`detect_tissue`, for datasets (see it for the arguments).

    Example::

        detection = ls.TissueDetection(spacing=16.0, threshold="otsu")
        mask = detection.detect(slide)
    """

    spacing: float = 8.0
    threshold: float | str = 220.0
    blur: float = 16.0
    opening: float = 48.0
    min_fraction: float = 0.0

    def detect(self, slide: Slide) -> TissueMask:
        return detect_tissue(
            slide,
            self.spacing,
            threshold=self.threshold,
            blur=self.blur,
            opening=self.opening,
            min_fraction=self.min_fraction,
        )
