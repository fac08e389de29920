"""Stream within a memory budget: choose the tile size, the kept graphs and tile batching
that minimise a step's predicted time.

What the budget covers: the memory the streamed trunk adds to a step, beyond the input
(which lives where the caller keeps it), the parameters and anything outside the trunk
(head, loss, optimizer state). In a training step that is the trunk's outputs and their
gradients, the parameter gradients being summed (two copies of the trainable
parameters), the input gradient buffer when the input requires grad, the graphs kept
from the forward, and the working set of the trunk call being backpropagated. Without
grad it is the outputs and one trunk call's forward working set.

The cost model, per candidate plan (a balanced grid, ``tile_batch`` equal-shaped tiles per
trunk call, the last ``K`` calls keeping their graphs):

- memory: the fixed terms above, plus the largest of (a) the kept graphs of all kept calls
  but the last and the working set of the last (the backward starts there), and (b) the
  working set of the largest recomputed call. Per-pixel bytes come from a meta-device run
  of the trunk (:mod:`.memory`): a kept graph holds what autograd saves, a working set is
  every allocation plus twice the largest activation.
- time: every call's forward and backward plus a second forward of each call whose
  graph was not kept, plus summing the parameter gradients once per call. A call's time
  is the sum over the trunk's operators of a roofline (:mod:`.speed`): FLOPs at the
  device's rate or bytes at the bandwidth of the cache or memory, whichever is longer,
  plus a cost per operator call and, on a CPU, page faults for outputs too large for the
  allocator to reuse. A backward is modelled as twice its forward (each layer computes the
  gradient of its input and of its weights). As a function of a call's pixels this is
  piecewise linear, so each candidate costs a few bisections.

The search tries every combination of per-dimension tile counts (all up to 8, then
about 30% apart, while the halo stays below three times the image), every power-of-two batch of
equal shapes, and for each the most kept graphs that fit; of the plans within 2% of the
fastest it keeps the one with the fewest trunk calls (the model is least sure of small
ones), then the fastest. Halo, recomputation and per-call overhead pull in different
directions: larger tiles have less halo and fewer calls, smaller tiles let more of the
image keep its graph and, on a CPU, run in cache.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .batching import batch_mixing
from .errors import TileTooSmallError
from .graph import TrunkGeometry
from .memory import TileProfile, element_size, profile_tile
from .plan import TilePlan, _DimensionPlanner, plan_tiles
from .speed import DeviceSpeed, device_speed

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_DENSE_COUNTS = 8  # every tile count per dimension up to this, then about 30% apart
_MAX_COUNT = 256
_MAX_HALO = 3.0  # per dimension: region pixels over image pixels
_MAX_TILES = 4096
_MAX_COMBINATIONS = 3000
_MAX_BATCH = 64
_REFERENCE_SIDE = 512  # the meta-device run uses regions about this large (costs scale with pixels)
_TOLERANCE = 0.02  # plans this close to the fastest count as equally fast


def parse_bytes(budget: int | str) -> int:
    """``budget`` in bytes: an int, or a string such as ``"512MiB"``, ``"2GB"``, ``"1.5GiB"``."""
    if isinstance(budget, bool):
        raise TypeError(f"memory_budget must be a number of bytes or a string like '4GiB', got {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget {budget!r} is not a size; write bytes as an int or a string such as '512MiB', "
                "'2GB' or '1.5GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"memory_budget must be a number of bytes or a string like '4GiB', got {budget!r}")
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return value


# ----------------------------------------------------------------------------- runs


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


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StreamPlan:
    """How :func:`~lightning_streaming.stream` runs a trunk: the tile grid, the trunk calls
    (equal-shaped tiles batched together), how many calls keep their graphs from the
    forward, and, when planned for a memory budget, the predicted memory and time.

    ``runs`` holds the tile indices (in the order of ``tiles``) of each trunk call, in the
    order the forward makes them; the last ``kept_runs`` keep their graphs.
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
        text = (
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


# ----------------------------------------------------------------------------- the cost model


class _CallTime:
    """Predicted seconds of one trunk call (forward, or backward at ``factor`` times the
    forward's work) as a function of its pixels: a sum of per-operator rooflines, which is
    piecewise linear in the pixels, tabulated once at its breakpoints."""

    def __init__(self, profile: TileProfile, speed: DeviceSpeed, factor: float):
        ops = profile.ops or ()
        as_tensor = lambda values: torch.tensor(list(values), dtype=torch.float64)  # noqa: E731
        self.flops = as_tensor(op.flops * factor for op in ops)
        self.moved = as_tensor(op.pixel_bytes * factor for op in ops)
        self.fixed = as_tensor(op.fixed_bytes * factor for op in ops)
        self.new = as_tensor(op.allocated for op in ops)
        self.speed = speed
        points = [torch.zeros(1, dtype=torch.float64)]
        moving = self.moved > 0
        points.append(((speed.cache_bytes - self.fixed) / self.moved)[moving])
        if speed.fresh_bytes_per_second:
            points.append((speed.reuse_bytes / self.new)[self.new > 0])
        for bandwidth in (speed.bytes_per_second, speed.cache_bytes_per_second):
            slope = self.flops / speed.flops_per_second - self.moved / bandwidth
            points.append((self.fixed / bandwidth / slope)[slope > 0])  # where arithmetic overtakes traffic
        merged = torch.cat(points)
        merged = torch.unique(merged[torch.isfinite(merged) & (merged >= 0)])
        self.points = merged.tolist()
        # Exactly affine between breakpoints: each interval's slope and intercept from two inner points.
        upper = torch.cat([merged[1:], merged[-1:] * 2 + 1])
        a, b = merged + (upper - merged) / 3, merged + 2 * (upper - merged) / 3
        ta, tb = self.exact(a), self.exact(b)
        slopes = (tb - ta) / (b - a)
        self.lines = list(zip(slopes.tolist(), (ta - slopes * a).tolist()))

    def exact(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model at each of ``pixels`` (a 1-d float64 tensor)."""
        speed, p = self.speed, pixels[:, None]
        nbytes = self.moved * p + self.fixed
        bandwidth = torch.where(nbytes <= speed.cache_bytes, speed.cache_bytes_per_second, speed.bytes_per_second)
        seconds = torch.maximum(self.flops * p / speed.flops_per_second, nbytes / bandwidth) + speed.seconds_per_op
        if speed.fresh_bytes_per_second:
            allocated = self.new * p
            faults = torch.where(allocated > speed.reuse_bytes, allocated / speed.fresh_bytes_per_second, 0.0)
            seconds = seconds + faults
        return seconds.sum(dim=1)

    def __call__(self, pixels: float) -> float:
        index = max(0, bisect.bisect_right(self.points, pixels) - 1)
        slope, intercept = self.lines[index]
        return slope * pixels + intercept


@dataclass(frozen=True)
class _Costs:
    """Everything the model needs for one trunk, input and device."""

    profile: TileProfile
    forward: _CallTime
    backward: _CallTime
    fixed: dict[str, int]  # bytes that do not depend on the plan
    accumulate: float  # seconds to add one call's parameter gradients into the sums
    grad: bool
    input_grad: bool

    def working(self, pixels: float) -> float:
        if not self.grad:
            return self.profile.inference_set(pixels)
        return self.profile.working_set(pixels, self.input_grad)

    def kept(self, pixels: float) -> float:
        return self.profile.kept(pixels)


@dataclass(frozen=True)
class _Group:
    """Identical trunk calls: ``count`` calls of ``pixels`` pixels and ``tiles`` tiles each."""

    pixels: float
    tiles: int
    count: int


@dataclass
class _Choice:
    """A candidate: per-dimension tile limits and batch, its predicted time, memory and calls."""

    seconds: float
    memory: float
    limits: tuple[int, ...]
    batch: int
    calls: int


def _evaluate(
    costs: _Costs, groups: list[_Group], budget: float, keep_graphs: int | None
) -> tuple[int, float, dict, float, dict] | None:
    """For the calls ``groups`` (most pixels first; the last calls keep their graphs): the
    most kept calls that fit ``budget``, or those of ``keep_graphs`` tiles. Returns (kept
    calls, memory, its breakdown, seconds, their breakdown), or None if nothing fits."""
    fixed = sum(costs.fixed.values())
    available = budget - fixed
    runs = sum(g.count for g in groups)
    first = costs.working(groups[0].pixels)  # the largest call, recomputed unless every graph is kept
    forward = sum(g.count * costs.forward(g.pixels) for g in groups)
    if not costs.grad:
        if first > available:
            return None
        return 0, fixed + first, {**costs.fixed, "working set": int(first)}, forward, {"forward": forward}
    # Graphs are kept from the last call backwards; the backward starts with the last call, whose graph
    # becomes its working set, while the other kept graphs wait.
    last = groups[-1].pixels
    extra = costs.working(last) - costs.kept(last)
    kept = tiles = 0
    held = 0.0
    for group in reversed(groups):
        per_call = costs.kept(group.pixels)
        if keep_graphs is not None:
            take = min(group.count, max(0, (keep_graphs - tiles) // group.tiles))
            if kept == 0 and take == 0 and keep_graphs >= 1:
                take = 1
        else:
            room = available - extra - held
            take = group.count if per_call <= 0 else min(group.count, max(0, int(room // per_call)))
        kept, tiles, held = kept + take, tiles + take * group.tiles, held + take * per_call
        if take < group.count:
            break
    kept_peak = held + extra if kept else 0.0
    recomputed_peak = first if kept < runs else 0.0
    memory = fixed + max(kept_peak, recomputed_peak)
    if memory > budget:
        return None
    backward = sum(g.count * costs.backward(g.pixels) for g in groups)
    recompute, left = 0.0, runs - kept
    for group in groups:  # the first calls are the recomputed ones
        n = min(left, group.count)
        recompute += n * costs.forward(group.pixels)
        left -= n
    accumulate = runs * costs.accumulate
    name = "kept graphs and working set" if kept_peak >= recomputed_peak else "working set"
    breakdown = {**costs.fixed, name: int(max(kept_peak, recomputed_peak))}
    times = {"forward": forward, "recompute": recompute, "backward": backward, "gradient sums": accumulate}
    return kept, memory, breakdown, forward + recompute + backward + accumulate, times


# ----------------------------------------------------------------------------- candidates


def _counts(units: int) -> list[int]:
    counts = list(range(1, min(units, _DENSE_COUNTS) + 1))
    n = _DENSE_COUNTS
    while n < min(units, _MAX_COUNT):
        n = min(units, _MAX_COUNT, max(n + 1, int(n * 1.3)))
        counts.append(n)
    return counts


def _dimension_candidates(planner: _DimensionPlanner, fixed_tile: int | None) -> list[tuple[int, list[int]]]:
    """Per tile count, (tile limit, region sizes) of a near-balanced split of the dimension
    into that many tiles of equal output units (the exact plan at that limit has at most
    as many tiles, none larger)."""
    if fixed_tile is not None:
        segments = planner.plan(fixed_tile)
        if segments is None:
            return []
        return [(fixed_tile, [s.size for s in segments])]
    found: dict[int, tuple[int, list[int]]] = {}
    units = planner.units
    for n in _counts(units):
        per = math.ceil(units / n)
        if per in found:
            continue
        starts = range(0, units, per)
        # The first and last tiles, and one inner tile standing for all inner ones (they differ by
        # at most the alignment): three regions to plan, whatever the count.
        first, last = planner.region(0, min(per, units) - 1).size, planner.region(starts[-1], units - 1).size
        inner = planner.region(per, 2 * per - 1).size if len(starts) > 2 else first
        sizes = [first] + [inner] * (len(starts) - 2) + ([last] if len(starts) > 1 else [])
        if len(sizes) > 1 and sum(sizes) > _MAX_HALO * planner.length:
            break
        found[per] = (max(sizes), sizes)
    return list(found.values())


def _shapes(per_dim: Sequence[list[int]], batch: int) -> list[tuple[int, int]]:
    """(region pixels per image, how many tiles) for each distinct region shape of the grid."""
    counters = [Counter(sizes) for sizes in per_dim]
    shapes: Counter = Counter()

    def walk(dim: int, pixels: int, count: int) -> None:
        if dim == len(counters):
            shapes[pixels] += count
            return
        for size, n in counters[dim].items():
            walk(dim + 1, pixels * size, count * n)

    walk(0, batch, 1)
    return list(shapes.items())


def _groups(shapes: list[tuple[int, int]], tile_batch: int) -> list[_Group]:
    """The trunk calls of ``tile_batch`` equal tiles (fewer for the remainder), most pixels first."""
    groups = []
    for pixels, count in shapes:
        full, rest = divmod(count, tile_batch)
        if full:
            groups.append(_Group(pixels * tile_batch, tile_batch, full))
        if rest:
            groups.append(_Group(pixels * rest, rest, 1))
    return sorted(groups, key=lambda g: -g.pixels)


def _batches(shapes: list[tuple[int, int]], fixed: int | None, image: int) -> list[int]:
    """Powers of two up to the most tiles of one shape, and that number; no batch of more
    pixels than the image (it could as well be a larger tile)."""
    if fixed is not None:
        return [fixed]
    largest = max(pixels for pixels, _ in shapes)
    most = max(1, min(max(count for _, count in shapes), _MAX_BATCH, image // max(largest, 1)))
    batches = [1]
    while batches[-1] * 2 <= most:
        batches.append(batches[-1] * 2)
    return batches + ([most] if most != batches[-1] else [])


# ----------------------------------------------------------------------------- planning


def _costs(
    module: nn.Module, geometry: TrunkGeometry, planners: list[_DimensionPlanner], input_shape: Sequence[int],
    grad: bool, input_grad: bool, input_dtype: torch.dtype, activation_dtype: torch.dtype | None,
    device: torch.device, speed: DeviceSpeed | None,
) -> _Costs:  # fmt: skip
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = activation_dtype or (param.dtype if param is not None else torch.float32)
    # The meta run, on a real tile's region (a length the trunk accepts) of about _REFERENCE_SIDE pixels.
    middle = [p.region(p.units // 2, p.units // 2).size for p in planners]  # one output pixel's region
    wanted = tuple(min(p.length, max(_REFERENCE_SIDE, m)) for p, m in zip(planners, middle))
    reference = tuple(p.plan(w)[0].size for p, w in zip(planners, wanted))  # type: ignore[index]
    profiles = geometry.__dict__.setdefault("_profiles", {})
    key = (int(input_shape[1]), input_dtype, dtype, reference)
    if key not in profiles:
        if len(profiles) >= 16:
            profiles.pop(next(iter(profiles)))
        shape = (1, int(input_shape[1])) + reference
        profiles[key] = profile_tile(module, shape, input_dtype=input_dtype, activation_dtype=dtype)
    profile = profiles[key]
    speed = speed or device_speed(device, dtype)
    batch, size = int(input_shape[0]), element_size(dtype)
    shapes = geometry.output_shapes(input_shape[2:])
    outputs = sum(batch * c * math.prod(s) for c, s in zip(profile.channels, shapes)) * size
    fixed = {"outputs": outputs}
    params = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    if grad:
        fixed["output gradients"] = outputs
        if params:
            fixed["parameter gradients"] = 2 * params
        if input_grad:
            fixed["input gradient"] = math.prod(input_shape) * element_size(input_dtype)
    accumulate = speed.op_seconds(0.0, 3.0 * params) if grad and params else 0.0
    return _Costs(
        profile, _CallTime(profile, speed, 1.0), _CallTime(profile, speed, 2.0), fixed, accumulate, grad, input_grad
    )


def plan_for_budget(
    module: nn.Module,
    geometry: TrunkGeometry,
    input_shape: Sequence[int],
    memory_budget: int | str,
    *,
    grad: bool = True,
    input_grad: bool = False,
    input_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tile_size: Sequence[int] | None = None,
    keep_graphs: int | None = None,
    tile_batch: int | None = None,
    speed: DeviceSpeed | None = None,
) -> StreamPlan:
    """The fastest :class:`StreamPlan` whose predicted memory fits ``memory_budget`` (see
    the module docstring for the model and the search). ``tile_size``, ``keep_graphs`` and
    ``tile_batch``, when given, are kept as they are and the rest is chosen.

    Raises :class:`~lightning_streaming.TileTooSmallError` when nothing fits.
    """
    budget = parse_bytes(memory_budget)
    spatial = tuple(int(s) for s in input_shape[2:])
    planners = [_DimensionPlanner(geometry, d, n) for d, n in enumerate(spatial)]
    costs = _costs(module, geometry, planners, input_shape, grad, input_grad, input_dtype, activation_dtype,
                   torch.device(device), speed)  # fmt: skip
    fixed_tiles = tuple(tile_size) if tile_size is not None else (None,) * len(spatial)
    per_dim = [_dimension_candidates(p, t) for p, t in zip(planners, fixed_tiles)]
    if any(not c for c in per_dim):
        plan_tiles(geometry, spatial, tuple(t or 1 for t in fixed_tiles))  # raises TileTooSmallError
    batch = int(input_shape[0])

    def search(batches_allowed: bool) -> tuple[_Choice | None, float]:
        found: list[_Choice] = []
        least = math.inf
        for combination in _combinations(per_dim):
            if math.prod(len(sizes) for _, sizes in combination) > _MAX_TILES:
                continue
            shapes = _shapes([sizes for _, sizes in combination], batch)
            fixed = tile_batch if tile_batch is not None else (None if batches_allowed else 1)
            for b in _batches(shapes, fixed, batch * math.prod(spatial)):
                groups = _groups(shapes, b)
                least = min(least, sum(costs.fixed.values()) + costs.working(groups[0].pixels))
                result = _evaluate(costs, groups, budget, keep_graphs if grad else None)
                if result is not None:
                    limits = tuple(limit for limit, _ in combination)
                    found.append(_Choice(result[3], result[1], limits, b, sum(g.count for g in groups)))
        if not found:
            return None, least
        # Within a few percent of the fastest, fewer and larger calls: the model is least sure of small ones.
        fastest = min(c.seconds for c in found)
        near = [c for c in found if c.seconds <= fastest * (1 + _TOLERANCE)]
        return min(near, key=lambda c: (c.calls, c.seconds, c.memory)), least

    best, least = search(batches_allowed=True)
    if best is not None and best.batch > 1:
        mixing = batch_mixing(module, geometry, int(input_shape[1]))
        if mixing is not None:
            if tile_batch is not None and tile_batch > 1:
                raise ValueError(f"tile_batch={tile_batch} runs tiles as one batch, which is not exact here: {mixing}")
            log.info("not batching tiles: %s", mixing)
            best, least = search(batches_allowed=False)
    if best is None:
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in costs.fixed.items())
        raise TileTooSmallError(
            f"memory_budget {format_bytes(budget)} is too small for an input of shape {tuple(input_shape)}: the plan "
            f"that needs the least memory needs about {format_bytes(least)} ({parts}, and one tile's working set). "
            "Raise the budget, lower the batch size, or give an explicit tile_size",
            tuple(p.minimum_tile() for p in planners),
        )
    return _finish(geometry, spatial, costs, best, budget, grad, keep_graphs, input_shape)


def _combinations(per_dim: list[list[tuple[int, list[int]]]]) -> list[tuple]:
    """Every combination of per-dimension candidates, thinned evenly where there are too many."""
    lists = [list(c) for c in per_dim]
    while math.prod(len(c) for c in lists) > _MAX_COMBINATIONS:
        longest = max(lists, key=len)
        del longest[1::2]
    return list(itertools.product(*lists))


def _finish(
    geometry: TrunkGeometry, spatial: tuple[int, ...], costs: _Costs, choice: _Choice, budget: int, grad: bool,
    keep_graphs: int | None, input_shape: Sequence[int],
) -> StreamPlan:  # fmt: skip
    """The exact plan at the chosen limits, its calls and the most kept graphs that fit."""
    tiles = plan_tiles(geometry, spatial, choice.limits)
    runs = group_runs(tiles, choice.batch, by_size=True)
    batch, regions = int(input_shape[0]), [math.prod(s.size for s in tile) for tile in tiles]
    groups = [_Group(batch * sum(regions[i] for i in run), len(run), 1) for run in runs]
    result = _evaluate(costs, groups, budget, keep_graphs if grad else None)
    if result is None:  # its regions are no larger than the candidate's, so this is not expected
        result = _evaluate(costs, groups, math.inf, (keep_graphs if keep_graphs is not None else 1) if grad else None)
        assert result is not None
        log.warning("the tile plan for %s needs about %s, over the budget of %s", tuple(input_shape),
                    format_bytes(result[1]), format_bytes(budget))  # fmt: skip
    kept, memory, breakdown, seconds, times = result
    whole = _Group(float(batch * math.prod(spatial)), 1, 1)
    conventional = _evaluate(costs, [whole], math.inf, 1 if grad else None)
    assert conventional is not None
    return StreamPlan(
        tiles, runs, kept, grad, budget, int(memory), seconds, breakdown, times, int(conventional[1]), conventional[3]
    )
