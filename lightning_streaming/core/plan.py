"""Tile plans: balanced grids of input regions whose outputs partition every output of the trunk."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

from .errors import TileTooSmallError
from .graph import TrunkGeometry


@dataclass(frozen=True)
class Segment:
    """One tile's extent along one dimension.

    The trunk runs on input pixels ``[start, stop)``. Of output ``k``, pixels
    ``outputs[k][0]:outputs[k][1]`` (in image coordinates) are exact and belong to this
    tile; the region's output pixel 0 is the image's output pixel ``outputs[k][2]``.
    ``out_start``, ``out_stop`` and ``out_offset`` are those of the first output.
    """

    start: int
    stop: int
    outputs: tuple[tuple[int, int, int], ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def out_start(self) -> int:
        return self.outputs[0][0]

    @property
    def out_stop(self) -> int:
        return self.outputs[0][1]

    @property
    def out_offset(self) -> int:
        return self.outputs[0][2]


@dataclass(frozen=True)
class TilePlan:
    """A grid of tiles: the product of per-dimension :class:`Segment` lists."""

    input_shape: tuple[int, ...]
    output_shapes: tuple[tuple[int, ...], ...]
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
    def output_shape(self) -> tuple[int, ...]:
        """Spatial shape of the (first) output."""
        return self.output_shapes[0]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.segments)

    @property
    def largest_region(self) -> tuple[int, ...]:
        return tuple(max(s.size for s in segments) for segments in self.segments)

    @property
    def pixels(self) -> int:
        """Input pixels the tiles read in all, halos included (a measure of the plan's cost)."""
        return math.prod(sum(s.size for s in segments) for segments in self.segments)

    def __repr__(self) -> str:
        outputs = self.output_shape if len(self.output_shapes) == 1 else self.output_shapes
        return (
            f"TilePlan(input={self.input_shape}, output={outputs}, grid={self.grid}, "
            f"largest_region={self.largest_region}, tile_size={self.tile_size})"
        )


def normalise_tile_size(tile_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(tile_size, int) and not isinstance(tile_size, bool):
        sizes: tuple = (tile_size,) * spatial_dims
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
    """Regions and greedy partitions along one dimension.

    Tiles partition the input axis into runs of *units* (``grain`` input pixels each); an
    output pixel ``o`` of output ``k`` belongs to the tile whose run holds its position
    ``floor(o * input pixels per output pixel)``, so every output is partitioned, whatever
    its resolution. For a trunk with one output of stride ``s``, a unit is one output pixel.
    """

    def __init__(self, geometry: TrunkGeometry, dim: int, length: int):
        self.geometry, self.dim, self.length = geometry, dim, length
        lengths = geometry.lengths(dim, length)
        assert lengths is not None, "plan_tiles checks the image size first"
        self.lengths = lengths
        self.align = geometry.alignment[dim]
        self.outputs = geometry.outputs
        self.out_lengths = [lengths[node] for node in self.outputs]
        self.steps = [1 / Fraction(scale[dim]) for scale in geometry.output_scales]  # input pixels per output pixel
        if all(step.denominator == 1 for step in self.steps):
            self.grain = math.gcd(*(int(step) for step in self.steps))
        else:
            self.grain = 1
        self.units = max(
            (math.floor((n - 1) * step) // self.grain + 1 for n, step in zip(self.out_lengths, self.steps) if n > 0),
            default=1,
        )
        self._regions: dict[tuple[int, int], Segment] = {}

    def _outputs_of(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Per output, the (inclusive, possibly empty) range of its pixels in units ``lo..hi``."""
        ranges = []
        for n, step in zip(self.out_lengths, self.steps):
            first = math.ceil(lo * self.grain / step)
            last = math.ceil((hi + 1) * self.grain / step) - 1
            ranges.append((max(first, 0), min(last, n - 1)))
        return ranges

    def region(self, lo: int, hi: int) -> Segment:
        """The smallest aligned input region whose outputs are exact on units ``lo..hi``."""
        key = (lo, hi)
        if key not in self._regions:
            ranges = self._outputs_of(lo, hi)
            boxes = {}
            for node, (first, last) in zip(self.outputs, ranges):
                if first <= last:
                    boxes[node] = _union(boxes.get(node), (first, last))
            needed = self.geometry.needed(self.dim, boxes, self.lengths)
            assert needed is not None
            start = needed[0] // self.align * self.align
            stop = needed[1] + 1
            # The trunk must run on the tile: no empty feature map, branches that meet of equal lengths,
            # lengths the operations accept, and the trunk's own conditions as for the image.
            while stop < self.length and self.geometry.lengths(self.dim, stop - start) is None:
                stop += 1
            while start > 0 and self.geometry.lengths(self.dim, stop - start) is None:
                start -= self.align
            outputs = tuple(
                (first, max(last + 1, first), int(start * Fraction(scale[self.dim])))
                for (first, last), scale in zip(ranges, self.geometry.output_scales)
            )
            self._regions[key] = Segment(start, stop, outputs)
        return self._regions[key]

    def chunk_end(self, lo: int, limit: int) -> int:
        """Largest ``hi`` such that the region of units ``lo..hi`` fits in ``limit`` (``lo - 1`` if none)."""
        if self.region(lo, lo).size > limit:
            return lo - 1
        good, bad = lo, self.units
        while bad - good > 1:
            mid = (good + bad) // 2
            if self.region(lo, mid).size <= limit:
                good = mid
            else:
                bad = mid
        return good

    def greedy(self, limit: int, max_count: int | None = None) -> list[Segment] | None:
        """Fewest regions of at most ``limit`` pixels covering the outputs; None if impossible
        (or if more than ``max_count`` would be needed)."""
        segments, lo = [], 0
        while lo < self.units:
            hi = self.chunk_end(lo, limit)
            if hi < lo or (max_count is not None and len(segments) == max_count):
                return None
            segments.append(self.region(lo, hi))
            lo = hi + 1
        return segments

    def minimum_tile(self) -> int:
        return max(self.region(u, u).size for u in range(self.units))

    def plan(self, tile: int) -> tuple[Segment, ...] | None:
        """Balanced segments of at most ``tile`` pixels; None if ``tile`` is too small."""
        whole = self.region(0, self.units - 1)
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


def _union(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def plan_tiles(geometry: TrunkGeometry, spatial_shape: Sequence[int], tile_size: int | Sequence[int]) -> TilePlan:
    """Plan a balanced tile grid for an input of ``spatial_shape``.

    Each dimension gets as few regions as ``tile_size`` (input pixels, halo included)
    allows, of nearly equal size, whose exact outputs partition every output of the trunk.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    tiles = normalise_tile_size(tile_size, geometry.spatial_dims)
    output_shapes = tuple(geometry.output_shapes(spatial_shape))
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
    return TilePlan(spatial_shape, output_shapes, tiles, segments)  # type: ignore[arg-type]
