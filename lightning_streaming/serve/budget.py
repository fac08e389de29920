"""How much memory a prediction job needs, and a budget that admits jobs only while the
running ones fit in it together."""

from __future__ import annotations

from .image_probe import ImageFacts

__all__ = ["MemoryBudget", "job_bytes"]

# An ordinary image is decoded whole: its pixels, then an RGBA copy (Pillow), about 8 bytes
# a pixel at the peak. Whole-slide formats are read region by region.
_DECODED_BYTES_PER_PIXEL = 8


def job_bytes(facts: ImageFacts, overhead: int) -> int:
    """Estimated peak memory of predicting one image, beyond the worker's model copy."""
    return overhead + (_DECODED_BYTES_PER_PIXEL * facts.pixels if facts.whole else 0)


class MemoryBudget:
    """Bytes the running jobs may hold together. Not thread-safe: one dispatcher owns it.

    Args:
        total: the budget in bytes.
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.reserved = 0
        self.peak = 0

    def can_ever_fit(self, need: int) -> bool:
        return need <= self.total

    def fits(self, need: int) -> bool:
        return self.reserved + need <= self.total

    def reserve(self, need: int) -> None:
        if not self.fits(need):
            raise RuntimeError(f"{need} bytes do not fit: {self.reserved} of {self.total} reserved")
        self.reserved += need
        self.peak = max(self.peak, self.reserved)

    def release(self, need: int) -> None:
        self.reserved = max(0, self.reserved - need)
