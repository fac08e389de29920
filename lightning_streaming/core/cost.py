"""The budget planner's cost model: the memory and time of a plan's trunk calls.

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
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .memory import TileProfile
from .speed import DeviceSpeed


class CallTime:
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
class Costs:
    """Everything the model needs for one trunk, input and device."""

    profile: TileProfile
    forward: CallTime
    backward: CallTime
    fixed: dict[str, int]  # bytes that do not depend on the plan
    accumulate: float  # seconds to add one call's parameter gradients into the sums
    grad: bool
    input_grad: bool
    rest: float = 0.0  # seconds of the trunk's children run whole after the streamed ones

    def working(self, pixels: float) -> float:
        if not self.grad:
            return self.profile.inference_set(pixels)
        return self.profile.working_set(pixels, self.input_grad)

    def kept(self, pixels: float) -> float:
        return self.profile.kept(pixels)


@dataclass(frozen=True)
class Group:
    """Identical trunk calls: ``count`` calls of ``pixels`` pixels and ``tiles`` tiles each."""

    pixels: float
    tiles: int
    count: int


def evaluate(
    costs: Costs, groups: list[Group], budget: float, keep_graphs: int | None
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
        times = {"forward": forward, **({"rest of the trunk": costs.rest} if costs.rest else {})}
        return 0, fixed + first, {**costs.fixed, "working set": int(first)}, sum(times.values()), times
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
    if costs.rest:
        times["rest of the trunk"] = costs.rest
    return kept, memory, breakdown, sum(times.values()), times


