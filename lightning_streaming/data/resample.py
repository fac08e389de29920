"""Area (box-filter) resampling by any factor, the same for a pixel whatever box it is read in."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["area_weights", "resample_area", "source_span"]

_BAND = 256  # output rows per pass, to bound temporary memory


def source_span(start: int, stop: int, ratio: float, in_size: int) -> tuple[int, int]:
    """Input pixels ``[a, b)`` covered by output pixels ``[start, stop)`` at ``ratio``
    input pixels per output pixel."""
    return max(0, math.floor(start * ratio)), min(in_size, math.ceil(stop * ratio - 1e-9))


def area_weights(start: int, stop: int, ratio: float, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of the input pixels each output pixel averages.

    Output pixel ``j`` covers input ``[j * ratio, (j + 1) * ratio)``; each input pixel
    ``k`` it overlaps gets weight ``overlap / ratio``. Both depend only on ``j`` (global
    coordinates), never on the box being read, so reading a region tile by tile gives the
    same pixels as reading it whole.

    Returns:
        ``(index, weight)``, each of shape ``(stop - start, K)``; padding entries have
        weight 0.
    """
    j = np.arange(start, stop, dtype=np.float64)
    lo, hi = j * ratio, (j + 1) * ratio
    first = np.floor(lo).astype(np.int64)
    last = np.minimum(np.ceil(hi - 1e-9).astype(np.int64), in_size) - 1
    width = int((last - first).max(initial=0)) + 1
    index = first[:, None] + np.arange(width)[None, :]
    weight = np.minimum(hi[:, None], index + 1.0) - np.maximum(lo[:, None], index.astype(np.float64))
    valid = index <= last[:, None]
    weight = np.where(valid, np.clip(weight, 0.0, None), 0.0)
    weight /= weight.sum(axis=1, keepdims=True)
    # Padding entries point at the first pixel (weight 0), so they stay inside the span read.
    return np.where(valid, index, first[:, None]), weight


def _along(pixels: np.ndarray, offset: int, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    # A fixed order of elementwise multiply-adds: deterministic per output pixel.
    out = None
    for k in range(index.shape[1]):
        taken = np.take(pixels, index[:, k] - offset, axis=axis).astype(np.float64)
        w = weight[:, k].reshape((-1,) + (1,) * (pixels.ndim - 1 - axis))
        out = taken * w if out is None else out + taken * w
    assert out is not None
    return out


def resample_area(
    pixels: np.ndarray,
    origin: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    ratio: tuple[float, float],
    in_size: tuple[int, int],
) -> np.ndarray:
    """Output pixels ``rows x cols`` (global output coordinates) averaged from ``pixels``.

    Args:
        pixels: ``(h, w, C)`` uint8 input holding at least the span of the output box.
        origin: global input coordinates ``(row, col)`` of ``pixels[0, 0]``.
        rows, cols: the output box, ``(start, stop)`` in global output coordinates.
        ratio: input pixels per output pixel, ``(rows, cols)``.
        in_size: the input's full size ``(height, width)``.

    Returns:
        ``(len(rows), len(cols), C)`` uint8, rounded half to even.
    """
    col_index, col_weight = area_weights(*cols, ratio[1], in_size[1])
    out = np.empty((rows[1] - rows[0], cols[1] - cols[0], pixels.shape[2]), dtype=np.uint8)
    for band in range(rows[0], rows[1], _BAND):
        band_stop = min(rows[1], band + _BAND)
        row_index, row_weight = area_weights(band, band_stop, ratio[0], in_size[0])
        lo, hi = int(row_index.min()), int(row_index.max()) + 1
        part = pixels[lo - origin[0] : hi - origin[0]]
        across = _along(part, origin[1], col_index, col_weight, axis=1)
        values = _along(across, lo, row_index, row_weight, axis=0)
        out[band - rows[0] : band_stop - rows[0]] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out
