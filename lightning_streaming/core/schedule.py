"""How :func:`~lightning_streaming.stream` runs a tile plan: the trunk calls (equal-shaped
tiles batched together), the order they run in and the graphs kept from the forward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .plan import TilePlan


def group_runs(plan: TilePlan, tile_batch: int, by_size: bool = False) -> tuple[tuple[int, ...], ...]:
    """The trunk calls for ``plan``: tile indices (raster order) per call, in the order the
    forward makes them. With ``tile_batch`` 1 every tile is a call, in raster order (the
    backward visits them in reverse); larger batches gather tiles of equal region shape.
    ``by_size`` orders calls from the most pixels to the fewest, so the kept ones, last,
    are the smallest (the budget planner's order)."""
    tiles = list(plan)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for index, tile in enumerate(tiles):
        shapes.setdefault(tuple(s.size for s in tile), []).append(index)
    if tile_batch <= 1:
        runs = [(i,) for i in range(len(tiles))]
    else:
        runs = [tuple(group[i : i + tile_batch]) for group in shapes.values() for i in range(0, len(group), tile_batch)]
    if by_size:
        runs.sort(key=lambda run: -len(run) * math.prod(s.size for s in tiles[run[0]]))
    return tuple(runs)


def kept_runs_for(runs: Sequence[Sequence[int]], keep_graphs: int) -> int:
    """How many of the last calls keep their graphs for ``keep_graphs`` tiles: those holding
    at most ``keep_graphs`` tiles, and at least the last call when ``keep_graphs`` >= 1."""
    kept, tiles = 0, 0
    for run in reversed(runs):
        if tiles + len(run) > keep_graphs:
            break
        kept, tiles = kept + 1, tiles + len(run)
    return max(kept, 1 if keep_graphs >= 1 and runs else 0)


@dataclass(frozen=True)
class StreamPlan:
    """How :func:`~lightning_streaming.stream` runs a trunk: the tile grid, the trunk calls
    (equal-shaped tiles batched together), how many calls keep their graphs from the
    forward, and, when planned for a memory budget, the predicted memory and time.

    ``runs`` holds the tile indices (in the order of ``tiles``) of each trunk call, in the
    order the forward makes them; the last ``kept_runs`` keep their graphs. ``split``
    ``(k, name)``: only the first ``k`` children of the ``Sequential`` trunk are streamed
    (up to the child ``name``; ``tiles`` is their plan) and the rest run whole on their
    output; None: the whole trunk is streamed.
    ``predicted_bytes`` is the memory the streamed trunk adds to a step (see
    :mod:`lightning_streaming.core.budget` for what it covers), ``memory`` and ``seconds``
    break the predictions down, ``conventional_bytes`` and ``conventional_seconds`` are the
    same model's predictions for running the trunk on the whole image at once.
    """

    tiles: TilePlan
    runs: tuple[tuple[int, ...], ...]
    kept_runs: int
    grad: bool = True
    memory_budget: int | None = None
    predicted_bytes: int | None = None
    predicted_seconds: float | None = None
    memory: dict[str, int] = field(default_factory=dict, compare=False)
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    conventional_bytes: int | None = None
    conventional_seconds: float | None = None
    split: tuple[int, str] | None = None

    @property
    def tile_size(self) -> tuple[int, ...]:
        return self.tiles.tile_size

    @property
    def keep_graphs(self) -> int:
        """Tiles whose graphs the forward keeps."""
        return sum(len(run) for run in self.runs[len(self.runs) - self.kept_runs :]) if self.kept_runs else 0

    @property
    def tile_batch(self) -> int:
        """The most tiles one trunk call runs together."""
        return max((len(run) for run in self.runs), default=1)

    def __str__(self) -> str:
        split = f"children up to {self.split[1]!r} streamed, the rest run whole; " if self.split else ""
        text = split + (
            f"tile_size {self.tile_size} (grid {self.tiles.grid}, largest region {self.tiles.largest_region}), "
            f"{len(self.runs)} trunk calls of up to {self.tile_batch} tile(s), keep_graphs {self.keep_graphs} "
            f"of {len(self.tiles)}"
        )
        if self.predicted_bytes is not None and self.predicted_seconds is not None:
            budget = f" of the {format_bytes(self.memory_budget)} budget" if self.memory_budget else ""
            parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in self.memory.items())
            times = ", ".join(f"{name} {value:.2f} s" for name, value in self.seconds.items())
            text += (
                f"; predicted {format_bytes(self.predicted_bytes)}{budget} ({parts}) and "
                f"{self.predicted_seconds:.2f} s ({times})"
            )
            if self.conventional_bytes and self.conventional_seconds:
                text += (
                    f"; {self.predicted_bytes / self.conventional_bytes:.2f}x the memory and "
                    f"{self.predicted_seconds / self.conventional_seconds:.2f}x the time predicted for the whole image "
                    f"at once"
                )
        return text

    def __repr__(self) -> str:
        return f"StreamPlan({self})"


def format_bytes(value: int | float | None) -> str:
    """``value`` bytes for people: GiB, MiB or KiB."""
    if value is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if value >= size:
            return f"{value / size:.{2 if unit == 'GiB' else 0}f} {unit}"
    return f"{value / 2**10:.0f} KiB"


def explicit_plan(tiles: TilePlan, keep_graphs: int, tile_batch: int, grad: bool = True) -> StreamPlan:
    """The plan of explicit settings (no budget): ``tile_batch`` 1 runs every tile on its
    own, in raster order, as streaming always has."""
    runs = group_runs(tiles, tile_batch)
    return StreamPlan(tiles, runs, kept_runs_for(runs, keep_graphs) if grad else 0, grad)


