"""What a dataset does with a bad sample: raise, or skip it with a warning and count it."""

from __future__ import annotations

import logging
from typing import Literal

import torch

__all__ = ["OnError", "SkipCounter", "check_on_error"]

log = logging.getLogger(__name__)

#: ``"raise"``: a bad sample stops training with an error naming the file and the problem.
#: ``"skip"``: it is logged as a warning, replaced by the next good sample, counted, and the
#: count is reported at the end of the epoch.
OnError = Literal["raise", "skip"]

_SLOTS = 64


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes.

    The counts live in a shared-memory tensor with one slot per worker (slot 0 for the
    main process), so workers (forked or spawned) write without races and the main process
    reads the sum at the end of an epoch.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self.total = 0

    def add(self) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_SLOTS - 1)
        self.counts[slot] += 1

    def take(self) -> int:
        """The count since the last call, which resets it."""
        n = int(self.counts.sum())
        self.counts.zero_()
        self.total += n
        return n
