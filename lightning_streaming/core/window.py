"""One spatial dimension of a local operation: which input pixels an output pixel reads.

Three shapes of window cover every local operation the analyser knows:

- :class:`Window`: a sliding window (convolution, pooling, padding, cropping, strided
  slicing); ``stride`` input pixels per output pixel.
- :class:`Spread`: each input pixel spreads over ``stride`` output pixels (transposed
  convolution, nearest-neighbour upsampling by an integer factor, pixel shuffle).
- :class:`Resample`: interpolation with ``align_corners=False`` at a rational scale
  (linear or cubic upsampling, nearest downsampling by an integer factor).

Each says how long its output is for an input of a given length, and which input pixels
(an inclusive box, clipped to the input) a range of output pixels reads. ``scale`` is
output pixels per input pixel: a tile whose input starts at pixel ``start`` has its
output start at ``start * scale``, so tiles start where that is a whole number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

PAD_MODES = ("zeros", "reflect", "replicate")


@dataclass(frozen=True)
class Window:
    """A sliding window along one spatial dimension.

    Output pixel ``o`` reads input pixels ``o * stride - pad_lo + dilation * j`` for
    ``j`` in ``range(kernel)``; pixels outside the input are padding. Elementwise
    operations are the identity window; a padding layer is a window of kernel 1 with
    padding (negative padding crops). ``divisor`` > 1: the operation only accepts input
    lengths divisible by it (pixel unshuffle).
    """

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    ceil_mode: bool = False
    pad_mode: str = "zeros"
    divisor: int = 1

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY

    @property
    def scale(self) -> Fraction:
        return Fraction(1, self.stride)

    @property
    def span(self) -> int:
        """Input pixels covered by one window, from first to last."""
        return self.dilation * (self.kernel - 1) + 1

    def output_length(self, length: int) -> int:
        """Output length for an input of ``length`` pixels (PyTorch's conv/pool formula);
        -1 for a length the operation refuses."""
        if self.divisor > 1 and length % self.divisor:
            return -1
        if self.pad_mode == "reflect" and length <= max(self.pad_lo, self.pad_hi):
            return -1  # PyTorch reflects only within the input
        room = length + self.pad_lo + self.pad_hi - self.span
        if room < 0:
            return 0
        if not self.ceil_mode:
            return room // self.stride + 1
        out = math.ceil(room / self.stride) + 1
        # PyTorch drops a last window that would start inside the right padding.
        if (out - 1) * self.stride >= length + self.pad_lo:
            out -= 1
        return out

    def input_box(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        """Input pixels (inclusive box, clipped to the input) read by outputs ``lo..hi``."""
        # A crop (negative padding) removes the first or last pixels of a *tile* too: the region
        # must reach that far past what the outputs read, so that they survive the crop.
        first = lo * self.stride - max(self.pad_lo, 0)
        last = hi * self.stride - self.pad_lo + self.span - 1 + max(0, -self.pad_hi)
        if self.pad_mode == "reflect":
            # Reflection at a true border reads pixels 1..pad from that border.
            if first < 0:
                last = max(last, min(self.pad_lo, length - 1))
            if last > length - 1:
                first = min(first, max(0, length - 1 - self.pad_hi))
        return clip_box(first, last, length)


def clip_box(first: int, last: int, length: int) -> tuple[int, int]:
    """``first..last`` clipped to the input; outputs that read only padding (or nothing)
    are given the nearest input pixel, so every output has a non-empty box (a superset
    of what it reads is always safe)."""
    first, last = max(first, 0), min(last, length - 1)
    if first > last:
        first = last = min(first, length - 1) if last >= 0 else 0
    return first, last


@dataclass(frozen=True)
class Spread:
    """Each input pixel spreads over ``stride`` output pixels: the window of a transposed
    convolution. Input pixel ``i`` adds to output pixels ``i * stride - padding +
    dilation * j`` for ``j`` in ``range(kernel)``; ``output_padding`` extra pixels end the
    output. Nearest-neighbour upsampling and pixel shuffle by ``f`` are
    ``Spread(kernel=f, stride=f)``."""

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0

    @property
    def scale(self) -> Fraction:
        return Fraction(self.stride)

    def output_length(self, length: int) -> int:
        if length <= 0:
            return 0
        return (length - 1) * self.stride - 2 * self.padding + self.dilation * (self.kernel - 1) + self.output_padding + 1

    def input_box(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        first = -((self.dilation * (self.kernel - 1) - lo - self.padding) // self.stride)  # ceil division
        last = (hi + self.padding) // self.stride
        return clip_box(first, last, length)


_RESAMPLE_TAPS = {"nearest": (0, 0), "nearest-exact": (0, 0), "linear": (0, 1), "cubic": (-1, 2)}


@dataclass(frozen=True)
class Resample:
    """Interpolation with ``align_corners=False`` by the factor ``num / den`` (PyTorch's
    ``F.interpolate`` with an integer ``scale_factor`` or its inverse).

    Output pixel ``o`` samples the input at ``(o + 0.5) * den / num - 0.5`` and reads the
    pixels of its interpolation taps around it (nearest: one pixel; linear: two; cubic:
    four), clamped to the input at its border.
    """

    num: int
    den: int
    mode: str  # "nearest", "nearest-exact", "linear" or "cubic"

    def __post_init__(self) -> None:
        if self.mode not in _RESAMPLE_TAPS:
            raise ValueError(f"unknown resampling mode {self.mode!r}")

    @property
    def scale(self) -> Fraction:
        return Fraction(self.num, self.den)

    def output_length(self, length: int) -> int:
        return length * self.num // self.den

    def _reads(self, o: int) -> tuple[int, int]:
        if self.mode == "nearest":
            centre = o * self.den // self.num
        elif self.mode == "nearest-exact":
            centre = (2 * o + 1) * self.den // (2 * self.num)
        else:
            # floor((o + 0.5) * den / num - 0.5), in integers
            centre = math.floor(Fraction((2 * o + 1) * self.den - self.num, 2 * self.num))
            if self.mode == "linear":
                centre = max(centre, 0)  # PyTorch clamps a negative source index to 0 before reading
        before, after = _RESAMPLE_TAPS[self.mode]
        return centre + before, centre + after

    def input_box(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        return clip_box(self._reads(lo)[0], self._reads(hi)[1], length)


IDENTITY = Window()

AnyWindow = "Window | Spread | Resample"
