"""Tile plans: balanced grids of input regions whose outputs partition the trunk's output."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import TileTooSmallError
from .graph import TrunkGeometry


@dataclass(frozen=True)
class Segment:
    """One tile's extent along one dimension.

    The trunk runs on input pixels ``[start, stop)``; of its output, pixels
    ``[out_start, out_stop)`` (in image coordinates) are exact and belong to this tile.
    The region's output pixel 0 is the image's output pixel ``out_offset``.
    """

    start: int
    stop: int
    out_start: int
    out_stop: int
    out_offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TilePlan:
    """A grid of tiles: the product of per-dimension :class:`Segment` lists."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tile_size: tuple[int, ...]
    segments: tuple[tuple[Segment, ...], ...]

    def __iter__(self) -> Iterator[tuple[Segment, ...]]:
        return iter(itertools.product(*self.segments))

    def __len__(self) -> int:
        count = 1
        for segments in self.segments:
            count *= len(segments)
        return count

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.segments)

    @property
    def largest_region(self) -> tuple[int, ...]:
        return tuple(max(s.size for s in segments) for segments in self.segments)

    def __repr__(self) -> str:
        return (
            f"TilePlan(input={self.input_shape}, output={self.output_shape}, grid={self.grid}, "
            f"largest_region={self.largest_region}, tile_size={self.tile_size})"
        )


def normalise_tile_size(tile_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(tile_size, int):
        sizes = (tile_size,) * spatial_dims
    elif isinstance(tile_size, (tuple, list)):
        sizes = tuple(tile_size)
    else:
        sizes = ()
    if len(sizes) != spatial_dims or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(
            f"tile_size must be a positive int or a tuple of {spatial_dims} positive ints "
            f"(one per spatial dimension), got {tile_size!r}"
        )
    return sizes


class _DimensionPlanner:
    """Regions and greedy partitions along one dimension."""

    def __init__(self, geometry: TrunkGeometry, dim: int, length: int):
        self.geometry, self.dim, self.length = geometry, dim, length
        self.lengths = geometry.lengths(dim, length)
        self.out_length = self.lengths[-1]
        self.align = geometry.alignment[dim]
        self.out_stride = geometry.output_strides[dim]
        self._regions: dict[tuple[int, int], Segment] = {}

    def region(self, lo: int, hi: int) -> Segment:
        """The smallest aligned input region whose output is exact on ``lo..hi``."""
        key = (lo, hi)
        if key not in self._regions:
            first, last = self.geometry.needed(self.dim, lo, hi, self.lengths)
            start = first // self.align * self.align
            stop = last + 1
            if self.geometry.has_merges:
                # Branches joined by an addition must have equal lengths in the tile too.
                while stop < self.length and self.geometry.lengths(self.dim, stop - start) is None:
                    stop += 1
            self._regions[key] = Segment(start, stop, lo, hi + 1, start // self.out_stride)
        return self._regions[key]

    def chunk_end(self, lo: int, limit: int) -> int:
        """Largest ``hi`` such that the region of ``lo..hi`` fits in ``limit`` (``lo - 1`` if none)."""
        if self.region(lo, lo).size > limit:
            return lo - 1
        good, bad = lo, self.out_length
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.region(lo, mid).size <= limit:
                good = mid
            else:
                bad = mid
        return good

    def greedy(self, limit: int, max_count: int | None = None) -> list[Segment] | None:
        """Fewest regions of at most ``limit`` pixels covering the output; None if impossible
        (or if more than ``max_count`` would be needed)."""
        segments, lo = [], 0
        while lo < self.out_length:
            hi = self.chunk_end(lo, limit)
            if hi < lo or (max_count is not None and len(segments) == max_count):
                return None
            segments.append(self.region(lo, hi))
            lo = hi + 1
        return segments

    def minimum_tile(self) -> int:
        return max(self.region(o, o).size for o in range(self.out_length))

    def plan(self, tile: int) -> tuple[Segment, ...] | None:
        """Balanced segments of at most ``tile`` pixels; None if ``tile`` is too small."""
        whole = self.region(0, self.out_length - 1)
        if whole.size <= tile:
            return (whole,)
        segments = self.greedy(tile)
        if segments is None:
            return None
        # Balance: the smallest limit that still needs no more tiles makes them nearly equal.
        count = len(segments)
        low, high = 1, tile
        while high - low > 0:
            mid = (low + high) // 2
            if self.greedy(mid, max_count=count) is not None:
                high = mid
            else:
                low = mid + 1
        return tuple(self.greedy(high))


def plan_tiles(geometry: TrunkGeometry, spatial_shape: Sequence[int], tile_size: int | Sequence[int]) -> TilePlan:
    """Plan a balanced tile grid for an input of ``spatial_shape``.

    Each dimension gets as few regions as ``tile_size`` (input pixels, halo included)
    allows, of nearly equal size, whose exact outputs partition the trunk's output.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    tiles = normalise_tile_size(tile_size, geometry.spatial_dims)
    output_shape = geometry.output_shape(spatial_shape)
    planners = [_DimensionPlanner(geometry, dim, length) for dim, length in enumerate(spatial_shape)]
    segments = tuple(planner.plan(tile) for planner, tile in zip(planners, tiles))
    if any(s is None for s in segments):
        minimum = tuple(planner.minimum_tile() for planner in planners)
        raise TileTooSmallError(
            f"tile_size {tiles} cannot hold the receptive field of one output pixel (plus alignment to the trunk's "
            f"stride {geometry.alignment}) along every dimension: the minimum usable tile for this "
            f"{'x'.join(map(str, spatial_shape))} input is {minimum}. Use a larger tile_size",
            minimum,
        )
    return TilePlan(spatial_shape, output_shape, tiles, segments)
