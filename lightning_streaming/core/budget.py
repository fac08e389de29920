"""Stream within a memory budget: choose the tile size, the kept graphs and tile batching
that minimise a step's predicted time.

What the budget covers: the memory the streamed trunk adds to a step, beyond the input
(which lives where the caller keeps it), the parameters and anything outside the trunk
(head, loss, optimizer state). In a training step that is the trunk's outputs and their
gradients, the parameter gradients being summed (two copies of the trainable
parameters), the input gradient buffer when the input requires grad, the graphs kept
from the forward, and the working set of the trunk call being backpropagated. Without
grad it is the outputs and one trunk call's forward working set.

The search considers streaming the whole trunk and, for a plain ``Sequential`` trunk,
streaming only its first children and running the rest whole (:mod:`.chain`; cuts after
the first and last child of each resolution). For each, it tries every combination of
per-dimension tile counts (all up to 8, then about 30% apart, while the halo stays below
three times the image), every power-of-two batch of equal shapes (where a call's fixed
cost is at least 1% of its work), and for each the most kept graphs that fit; of the
plans within 2% of the fastest it keeps the one with the fewest trunk calls (the model is
least sure of small ones), then the whole trunk over a cut, then the fastest. Halo,
recomputation and per-call overhead pull in different directions: larger tiles have
less halo and fewer calls, smaller tiles let more of the image keep its graph and, on a
CPU, run in cache.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .batching import batch_mixing
from .chain import chain_of, prefix_geometry
from .cost import CallTime, Costs, Group, evaluate
from .errors import TileTooSmallError
from .graph import TrunkGeometry
from .memory import TileProfile, element_size, profile_tile
from .plan import _DimensionPlanner, plan_tiles
from .schedule import StreamPlan, format_bytes, group_runs
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
_BATCH_PAYS = 0.01  # batching is tried where a call's fixed cost is at least this share of its work


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


@dataclass
class _Choice:
    """A candidate: per-dimension tile limits and batch, its predicted time, memory and calls."""

    seconds: float
    memory: float
    limits: tuple[int, ...]
    batch: int
    calls: int


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


def _groups(shapes: list[tuple[int, int]], tile_batch: int) -> list[Group]:
    """The trunk calls of ``tile_batch`` equal tiles (fewer for the remainder), most pixels first."""
    groups = []
    for pixels, count in shapes:
        full, rest = divmod(count, tile_batch)
        if full:
            groups.append(Group(pixels * tile_batch, tile_batch, full))
        if rest:
            groups.append(Group(pixels * rest, rest, 1))
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


@dataclass(frozen=True)
class _Option:
    """A way to stream the trunk: all of it (``streamed`` None), or its first ``streamed``
    children with the rest run whole; the geometry and costs of the streamed part."""

    streamed: int | None
    name: str
    geometry: TrunkGeometry
    costs: Costs


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
    ``tile_batch``, when given, are kept as they are and the rest is chosen; with an
    explicit ``tile_size`` the whole trunk is streamed.

    Raises :class:`~lightning_streaming.TileTooSmallError` when nothing fits.
    """
    budget = parse_bytes(memory_budget)
    spatial = tuple(int(s) for s in input_shape[2:])
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = activation_dtype or (param.dtype if param is not None else torch.float32)
    flags = _Flags(grad, input_grad, input_dtype, dtype, int(input_shape[0]), spatial, speed or device_speed(device, dtype))
    options = _options(module, geometry, input_shape, flags, budget, explicit_tile=tile_size is not None)
    fixed = tuple(tile_size) if tile_size is not None else (None,) * len(spatial)
    best, least = _search(options, flags, budget, fixed, keep_graphs, tile_batch)
    if best is not None and best[0].batch > 1:
        mixing = batch_mixing(module, geometry, int(input_shape[1]))
        if mixing is not None:
            if tile_batch is not None and tile_batch > 1:
                raise ValueError(f"tile_batch={tile_batch} runs tiles as one batch, which is not exact here: {mixing}")
            log.info("not batching tiles: %s", mixing)
            best, least = _search(options, flags, budget, fixed, keep_graphs, 1)
    if best is None:
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in options[0].costs.fixed.items())
        raise TileTooSmallError(
            f"memory_budget {format_bytes(budget)} is too small for an input of shape {tuple(input_shape)}: the plan "
            f"that needs the least memory needs about {format_bytes(least)} ({parts}, and one tile's working set). "
            "Raise the budget, lower the batch size, or give an explicit tile_size",
            tuple(_DimensionPlanner(geometry, d, n).minimum_tile() for d, n in enumerate(spatial)),
        )
    return _finish(best[1], options[0].costs, best[0], budget, keep_graphs, flags)


def _options(
    module: nn.Module, geometry: TrunkGeometry, input_shape: Sequence[int], flags: "_Flags", budget: int,
    explicit_tile: bool,
) -> list[_Option]:  # fmt: skip
    """The whole trunk streamed, then each cut of a ``Sequential`` trunk whose fixed costs fit."""
    chain = chain_of(module) if not explicit_tile else []
    profile = _profile(module, geometry, input_shape, flags.input_dtype, flags.dtype, [m for _, m in chain])
    options = [_Option(None, "", geometry, _costs(profile, list(module.parameters()), geometry, flags))]
    for cut in _cuts(profile, chain, geometry):
        name, prefix = chain[cut.index][0], prefix_geometry(geometry, chain[cut.index][0])
        if prefix is None:
            continue
        streamed_params = [p for _, m in chain[: cut.index + 1] for p in m.parameters()]
        rest_params = [p for _, m in chain[cut.index + 1 :] for p in m.parameters()]
        costs = _costs(profile.prefix(cut), streamed_params, prefix, flags, profile.suffix(cut), rest_params)
        if sum(costs.fixed.values()) < budget:
            options.append(_Option(cut.index + 1, name, prefix, costs))
    return options


def _search(
    options: list[_Option], flags: "_Flags", budget: int, fixed_tiles: tuple, keep_graphs: int | None,
    tile_batch: int | None,
) -> tuple[tuple[_Choice, _Option] | None, float]:  # fmt: skip
    """The chosen candidate (and its option), and the least memory any candidate needs."""
    pixels = flags.batch * math.prod(flags.spatial)
    keep = keep_graphs if flags.grad else None
    # No plan of an option beats its streamed part as one tile with its graph kept: try the
    # options in that order, and stop where that bound passes the fastest plan found.
    bounds = {}
    for option in options:
        whole = evaluate(option.costs, [Group(float(pixels), 1, 1)], math.inf, 1 if flags.grad else None)
        bounds[id(option)] = whole[3] if whole else math.inf
    found: list[tuple[_Choice, _Option]] = []
    least = math.inf
    for option in sorted(options, key=lambda o: bounds[id(o)]):
        if found and bounds[id(option)] > min(c.seconds for c, _ in found) * (1 + _TOLERANCE):
            break
        planners = [_DimensionPlanner(option.geometry, d, n) for d, n in enumerate(flags.spatial)]
        per_dim = [_dimension_candidates(p, t) for p, t in zip(planners, fixed_tiles)]
        if any(not c for c in per_dim):
            plan_tiles(option.geometry, flags.spatial, tuple(t or 1 for t in fixed_tiles))  # raises TileTooSmallError
        fixed = sum(option.costs.fixed.values())
        per_call = option.costs.forward(0.0) + option.costs.backward(0.0)  # a call's fixed cost
        for combination in _combinations(per_dim):
            if math.prod(len(sizes) for _, sizes in combination) > _MAX_TILES:
                continue
            shapes = _shapes([sizes for _, sizes in combination], flags.batch)
            allowed = tile_batch
            if allowed is None and per_call < _BATCH_PAYS * option.costs.forward(max(p for p, _ in shapes)):
                allowed = 1  # a call's fixed cost is negligible next to its work: batching cannot pay
            for b in _batches(shapes, allowed, pixels):
                groups = _groups(shapes, b)
                least = min(least, fixed + option.costs.working(groups[0].pixels))
                result = evaluate(option.costs, groups, budget, keep)
                if result is not None:
                    limits = tuple(limit for limit, _ in combination)
                    found.append((_Choice(result[3], result[1], limits, b, sum(g.count for g in groups)), option))
    if not found:
        return None, least
    # Within a few percent of the fastest: fewer, larger calls (the model is least sure of small
    # ones), then the whole trunk streamed rather than cut.
    fastest = min(c.seconds for c, _ in found)
    near = [(c, o) for c, o in found if c.seconds <= fastest * (1 + _TOLERANCE)]
    return min(near, key=lambda co: (co[0].calls, co[1].streamed is not None, co[0].seconds, co[0].memory)), least


@dataclass(frozen=True)
class _Flags:
    """What the plan is for: grad mode, dtypes, the input's batch and spatial shape, the device's speed."""

    grad: bool
    input_grad: bool
    input_dtype: torch.dtype
    dtype: torch.dtype
    batch: int
    spatial: tuple[int, ...]
    speed: DeviceSpeed


def _cuts(profile: TileProfile, chain: list[tuple[str, nn.Module]], geometry: TrunkGeometry) -> list:
    """Where to try cutting the chain: after the first and the last child at each resolution
    (a cut inside a resolution saves no memory that its ends do not), never after the last."""
    scales = []
    for cut in profile.cuts[:-1]:
        nodes = geometry.module_nodes.get(chain[cut.index][0])
        scales.append(geometry.nodes[nodes[-1]].scale if nodes and cut.channels else None)
    kept = []
    for i, cut in enumerate(profile.cuts[:-1]):
        if scales[i] is None:
            continue
        first = i == 0 or scales[i - 1] != scales[i]
        last = i + 1 == len(scales) or scales[i + 1] != scales[i]
        if first or last:
            kept.append(cut)
    return kept


def _profile(
    module: nn.Module, geometry: TrunkGeometry, input_shape: Sequence[int], input_dtype: torch.dtype,
    dtype: torch.dtype, chain: list[nn.Module],
) -> TileProfile:  # fmt: skip
    """The trunk's meta-device profile, on a real tile's region (a length the trunk accepts)
    of about ``_REFERENCE_SIDE`` pixels; cached with the geometry."""
    spatial = tuple(int(s) for s in input_shape[2:])
    planners = [_DimensionPlanner(geometry, d, n) for d, n in enumerate(spatial)]
    # The region of the first units making about _REFERENCE_SIDE pixels: a length the trunk accepts.
    spans = [max(1, min(p.units, p.units * _REFERENCE_SIDE // p.length)) for p in planners]
    reference = tuple(p.region(0, span - 1).size for p, span in zip(planners, spans))
    profiles = geometry.__dict__.setdefault("_profiles", {})
    key = (int(input_shape[1]), input_dtype, dtype, reference, bool(chain))
    if key not in profiles:
        if len(profiles) >= 16:
            profiles.pop(next(iter(profiles)))
        shape = (1, int(input_shape[1])) + reference
        profiles[key] = profile_tile(module, shape, input_dtype=input_dtype, activation_dtype=dtype, chain=chain)
    return profiles[key]


def _costs(
    profile: TileProfile, params: list[torch.Tensor], geometry: TrunkGeometry, flags: _Flags,
    rest: TileProfile | None = None, rest_params: Sequence[torch.Tensor] = (),
) -> Costs:  # fmt: skip
    """The costs of streaming ``profile``'s part of the trunk (outputs of ``geometry``) and
    running ``rest`` whole after it."""
    size = element_size(flags.dtype)
    shapes = geometry.output_shapes(flags.spatial)
    outputs = sum(flags.batch * c * math.prod(s) for c, s in zip(profile.channels, shapes)) * size
    fixed = {"outputs": outputs}
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    if flags.grad:
        fixed["output gradients"] = outputs
        if trained:
            fixed["parameter gradients"] = 2 * trained
        if flags.input_grad:
            fixed["input gradient"] = int(flags.batch * math.prod(flags.spatial) * profile.input)
    seconds = 0.0
    if rest is not None:
        pixels = flags.batch * math.prod(flags.spatial)
        # Run whole: every allocation (autograd may keep each), twice its largest, its parameters' gradients,
        # and a copy of its input (a CPU convolution reorders its input into a blocked layout).
        held = (rest.allocated + 2 * rest.largest if flags.grad else rest.no_grad_peak) + rest.input
        rest_trained = sum(p.numel() * p.element_size() for p in rest_params if p.requires_grad) if flags.grad else 0
        fixed["rest of the trunk, run whole"] = int(pixels * held + rest_trained)
        forward = CallTime(rest, flags.speed, 1.0)(pixels)
        seconds = forward + (CallTime(rest, flags.speed, 2.0)(pixels) if flags.grad else 0.0)
    accumulate = flags.speed.op_seconds(0.0, 3.0 * trained) if flags.grad and trained else 0.0
    return Costs(
        profile, CallTime(profile, flags.speed, 1.0), CallTime(profile, flags.speed, 2.0), fixed, accumulate,
        flags.grad, flags.input_grad, seconds,
    )  # fmt: skip


def _combinations(per_dim: list[list[tuple[int, list[int]]]]) -> list[tuple]:
    """Every combination of per-dimension candidates, thinned evenly where there are too many."""
    lists = [list(c) for c in per_dim]
    while math.prod(len(c) for c in lists) > _MAX_COMBINATIONS:
        longest = max(lists, key=len)
        del longest[1::2]
    return list(itertools.product(*lists))


def _finish(option: _Option, whole: Costs, choice: _Choice, budget: int, keep_graphs: int | None, flags: _Flags) -> StreamPlan:
    """The exact plan at the chosen limits, its calls and the most kept graphs that fit."""
    tiles = plan_tiles(option.geometry, flags.spatial, choice.limits)
    runs = group_runs(tiles, choice.batch, by_size=True)
    regions = [math.prod(s.size for s in tile) for tile in tiles]
    groups = [Group(flags.batch * sum(regions[i] for i in run), len(run), 1) for run in runs]
    keep = keep_graphs if flags.grad else None
    result = evaluate(option.costs, groups, budget, keep)
    if result is None:  # its regions are no larger than the candidate's, so this is not expected
        result = evaluate(option.costs, groups, math.inf, (keep if keep is not None else 1) if flags.grad else None)
        assert result is not None
        log.warning("the tile plan for %s needs about %s, over the budget of %s", flags.spatial,
                    format_bytes(result[1]), format_bytes(budget))  # fmt: skip
    kept, memory, breakdown, seconds, times = result
    conventional = evaluate(whole, [Group(float(flags.batch * math.prod(flags.spatial)), 1, 1)], math.inf,
                            1 if flags.grad else None)  # fmt: skip
    assert conventional is not None
    split = (option.streamed, option.name) if option.streamed is not None else None
    return StreamPlan(
        tiles, runs, kept, flags.grad, budget, int(memory), seconds, breakdown, times, int(conventional[1]),
        conventional[3], split,
    )  # fmt: skip
