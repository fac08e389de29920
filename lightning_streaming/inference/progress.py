"""A progress bar fed with fractions: tqdm's (a dependency of Lightning) where importable,
else a line logged every tenth."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator

__all__ = ["progress_bar"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """A ``progress(fraction)`` callable for the block, drawing a bar on stderr."""
    if not enabled:
        yield lambda fraction: None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with Lightning
        tqdm = None
    if tqdm is None:
        shown = [-1]

        def report(fraction: float) -> None:
            tenth = int(fraction * 10)
            if tenth > shown[0]:
                shown[0] = tenth
                log.info("%s: %d%%", description, 10 * tenth)

        yield report
        return
    bar = tqdm(total=1000, desc=description, unit="‰", file=sys.stderr, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")  # fmt: skip

    def update(fraction: float) -> None:
        target = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        if target > bar.n:
            bar.update(target - bar.n)

    try:
        yield update
    finally:
        bar.close()
