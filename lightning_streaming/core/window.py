"""One spatial dimension of a local operation: which input pixels an output pixel reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

PAD_MODES = ("zeros", "reflect", "replicate")


@dataclass(frozen=True)
class Window:
    """A sliding window along one spatial dimension.

    Output pixel ``o`` reads input pixels ``o * stride - pad_lo + dilation * j`` for
    ``j`` in ``range(kernel)``; pixels outside the input are padding. Elementwise
    operations are the identity window; a padding layer is a window of kernel 1 with
    padding (negative padding crops).
    """

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    ceil_mode: bool = False
    pad_mode: str = "zeros"

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY

    @property
    def span(self) -> int:
        """Input pixels covered by one window, from first to last."""
        return self.dilation * (self.kernel - 1) + 1

    def output_length(self, length: int) -> int:
        """Output length for an input of ``length`` pixels (PyTorch's conv/pool formula)."""
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
        first = lo * self.stride - self.pad_lo
        last = hi * self.stride - self.pad_lo + self.span - 1
        if self.pad_mode == "reflect":
            # Reflection at a true border reads pixels 1..pad from that border.
            if first < 0:
                last = max(last, min(self.pad_lo, length - 1))
            if last > length - 1:
                first = min(first, max(0, length - 1 - self.pad_hi))
        return max(first, 0), min(last, length - 1)


IDENTITY = Window()
