"""Tile batching (exact, refused for trunks that mix a batch) and the memory-budget planner.

Batching with a transform of uint8 tiles and with a RegionSource is tested in
test_core_exactness.py, beside the same tests without batching."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from trunks import convnext_trunk, resnet50_trunk, resnet_trunk, table1_network

import lightning_streaming as ls
from lightning_streaming.core import DeviceSpeed, set_device_speed
from lightning_streaming.core.batching import batch_mixing
from lightning_streaming.core.schedule import group_runs, kept_runs_for
from lightning_streaming.core.graph import geometry_of


class Pyramid(nn.Module):
    """Two outputs at strides 2 and 4, returned as a dict holding a list."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 5, 3, stride=2, padding=1)

    def forward(self, x):
        fine = torch.relu(self.a(x))
        coarse = self.b(fine)
        return {"fine": fine, "coarse": [coarse, coarse.tanh()]}


class MixesBatch(nn.Module):
    """Local in space, but each image's result depends on the others of its batch."""

    def __init__(self, how: str):
        super().__init__()
        self.conv, self.how = nn.Conv2d(3, 4, 3, padding=1), how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "mean":
            return y * y.mean(0, keepdim=True).tanh()
        if self.how == "flip":
            return y + y.flip(0)
        if self.how == "size":
            return y * x.shape[0]
        n, c, h, w = y.shape  # attention across the batch at each pixel
        z = y.permute(2, 3, 0, 1).reshape(h * w, n, c)
        return (torch.softmax(z @ z.transpose(1, 2), -1) @ z).reshape(h, w, n, c).permute(2, 3, 0, 1)


def check(trunk, shape, tile, **kwargs):
    report = ls.verify(trunk, shape, tile, **kwargs)
    assert report.passed
    return report


# ------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("keep_graphs", [0, 1, 5, 100])
def test_batched_tiles_are_exact_on_awkward_sizes(keep_graphs):
    shape, tile = (2, 3, 130, 101), 60
    plan = ls.stream_plan(resnet_trunk(depth=1), shape, tile, tile_batch=4, keep_graphs=keep_graphs)
    assert plan.tile_batch > 1 and len(plan.runs) < len(plan.tiles)
    for run in plan.runs:  # a call batches tiles of one region shape
        assert len({tuple(s.size for s in list(plan.tiles)[i]) for i in run}) == 1
    check(resnet_trunk(depth=1), shape, tile, tile_batch=4, keep_graphs=keep_graphs)


def test_batched_multi_output_trunk_and_input_gradient():
    check(Pyramid(), (2, 3, 61, 47), 24, tile_batch=3, keep_graphs=2)
    check(Pyramid(), (1, 3, 64, 64), 20, tile_batch=16)


def test_batched_no_grad_forward_matches():
    trunk = resnet_trunk(depth=2).double()
    x = torch.randn(2, 3, 190, 170, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ls.stream(trunk, x, 110, tile_batch=4), trunk(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["mean", "flip", "size", "attention"])
def test_batching_is_refused_for_trunks_that_mix_the_batch(how):
    trunk = MixesBatch(how).double()
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64)
    check(trunk, tuple(x.shape), 12)  # streaming one tile at a time is exact
    with pytest.raises(ValueError, match="tile_batch=2 runs tiles as one batch, which is not exact here"):
        ls.stream(trunk, x, 12, tile_batch=2)


@pytest.mark.parametrize("trunk", [resnet_trunk(depth=2), convnext_trunk(), Pyramid(), table1_network()], ids=type)
def test_local_trunks_treat_the_batch_independently(trunk):
    geometry = geometry_of(trunk, 2)
    assert batch_mixing(trunk, geometry, 3) is None


def test_runs_group_equal_shapes_and_keep_graphs_counts_tiles():
    plan = ls.tile_plan(table1_network(), (1, 3, 100, 70), 30)
    assert group_runs(plan, 1) == tuple((i,) for i in range(len(plan)))  # as streaming always ran: raster order
    runs = group_runs(plan, 3)
    assert sorted(i for run in runs for i in run) == list(range(len(plan))) and max(map(len, runs)) == 3
    assert kept_runs_for(((0, 1), (2, 3), (4,)), 0) == 0
    assert kept_runs_for(((0, 1), (2, 3), (4,)), 1) == 1
    assert kept_runs_for(((0, 1), (2, 3), (4,)), 2) == 1
    assert kept_runs_for(((0, 1), (2, 3), (4,)), 3) == 2
    assert kept_runs_for(((0, 1, 2),), 1) == 1  # at least the last call: its graph is the backward's working set


# ------------------------------------------------------------------------------- the planner


def test_budget_plan_fits_is_exact_and_shown():
    shape = (2, 3, 320, 280)
    trunk = resnet_trunk(depth=2).double()  # as verify() runs it: float64, with the input gradient
    options = dict(input_dtype=torch.float64, input_grad=True)
    whole = ls.stream_plan(trunk, shape, memory_budget="1GiB", **options)
    assert len(whole.tiles) == 1 and whole.keep_graphs == 1  # everything fits: the conventional computation
    budget = whole.predicted_bytes * 6 // 10
    plan = ls.stream_plan(trunk, shape, memory_budget=budget, **options)
    assert len(plan.tiles) > 1 and plan.predicted_bytes <= budget
    assert plan.memory_budget == budget and plan.predicted_seconds > 0 and plan.conventional_bytes > budget
    text = str(plan)
    for word in ("tile_size", "keep_graphs", "trunk calls", "predicted", "budget", "working set", "input gradient"):
        assert word in text
    check(trunk, shape, "auto", memory_budget=budget)


def test_more_budget_never_predicts_a_slower_step():
    trunk, shape = resnet_trunk(depth=2), (1, 3, 300, 260)
    largest = ls.stream_plan(trunk, shape, memory_budget="1GiB").predicted_bytes
    budgets = [int(largest * fraction) for fraction in (0.45, 0.6, 0.8, 1)]
    times = [ls.stream_plan(trunk, shape, memory_budget=budget).predicted_seconds for budget in budgets]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_explicit_settings_are_kept_within_a_budget():
    trunk, shape = resnet_trunk(depth=2), (1, 3, 300, 260)
    plan = ls.stream_plan(trunk, shape, 128, memory_budget="1GiB")
    assert plan.tile_size == (128, 128) and plan.keep_graphs == len(plan.tiles) > 1  # room for every graph
    plan = ls.stream_plan(trunk, shape, memory_budget="1GiB", keep_graphs=0, tile_batch=1)
    assert plan.keep_graphs == 0 and plan.tile_batch == 1
    default = ls.stream_plan(trunk, shape, 128)  # no budget: exactly as before
    assert default.tiles == ls.tile_plan(trunk, shape, 128) and default.keep_graphs == 1 and default.tile_batch == 1


def test_too_small_a_budget_says_what_the_least_plan_needs():
    with pytest.raises(ls.TileTooSmallError, match=r"memory_budget 10 KiB is too small .* needs about"):
        ls.stream_plan(resnet_trunk(depth=2), (1, 3, 300, 260), memory_budget=10_000)


def test_a_budget_plan_is_made_once_and_logged(caplog):
    trunk = resnet_trunk(depth=1)
    x = torch.randn(1, 3, 90, 80)
    with caplog.at_level(logging.INFO, logger="lightning_streaming.core.stream"):
        for _ in range(2):
            ls.stream(trunk, x, memory_budget="2MiB").sum().backward()
    (record,) = [r for r in caplog.records if "memory_budget" in r.getMessage()]
    assert "keep_graphs" in record.getMessage()


@pytest.fixture
def slow_calls():
    """A device on which each operator call costs a millisecond: batching tiles pays."""
    speed = DeviceSpeed(1e12, 1e11, 1e11, 0, 0.0, 2**62, 1e-3)
    set_device_speed("cpu", speed)
    yield speed
    set_device_speed("cpu", None)


def test_planner_batches_equal_tiles_when_calls_are_costly(slow_calls):
    shape = (1, 3, 256, 256)
    trunk = table1_network().double()
    plan = ls.stream_plan(trunk, shape, 40, memory_budget="1GiB", input_dtype=torch.float64)
    assert plan.tile_batch > 1 and len(plan.runs) < len(plan.tiles)
    check(trunk, shape, 40, memory_budget="1GiB")


def test_planner_never_batches_a_trunk_that_mixes_the_batch(slow_calls, caplog):
    shape = (2, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="lightning_streaming.core.budget"):
        plan = ls.stream_plan(MixesBatch("mean"), shape, 12, memory_budget="1GiB")
    assert plan.tile_batch == 1
    assert any("mixes the images of a batch" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_resnet50_plans_within_a_budget_and_under_autocast():
    trunk = resnet50_trunk()
    shape = (1, 3, 2048, 2048)
    plan = ls.stream_plan(trunk, shape, memory_budget="3GiB")
    assert plan.predicted_bytes <= 3 * 2**30 and len(plan.tiles) > 1
    half = ls.stream_plan(trunk, shape, memory_budget="3GiB", activation_dtype=torch.bfloat16)
    assert half.predicted_bytes <= 3 * 2**30 and len(half.tiles) <= len(plan.tiles)  # half the bytes per pixel
    inference = ls.stream_plan(trunk, shape, memory_budget="3GiB", grad=False)
    assert inference.keep_graphs == 0 and len(inference.tiles) <= len(plan.tiles)


def test_a_sequential_trunk_may_stream_only_its_first_children_and_stays_exact():
    trunk = resnet_trunk(depth=2).double()
    shape = (2, 3, 320, 280)
    options = dict(input_dtype=torch.float64, input_grad=True)
    whole = ls.stream_plan(trunk, shape, memory_budget="1GiB", **options)
    assert whole.split is None and len(whole.tiles) == 1  # no reason to split when everything fits
    budget = whole.predicted_bytes * 4 // 10
    plan = ls.stream_plan(trunk, shape, memory_budget=budget, **options)
    assert plan.split is not None and plan.predicted_bytes <= budget
    assert "the rest run whole" in str(plan) and "rest of the trunk" in str(plan)
    # The streamed children's output is the plan's output: a stride-4 map for the first stages.
    assert plan.tiles.output_shape != ls.tile_plan(trunk, shape, 320).output_shape
    check(trunk, shape, "auto", memory_budget=budget)


def test_only_plain_sequential_trunks_are_split():
    from lightning_streaming.core.chain import chain_of

    trunk = resnet_trunk(depth=2)
    assert [name for name, _ in chain_of(trunk)] == ["0", "1", "2", "3", "4", "5"]
    assert chain_of(Pyramid()) == []  # its own forward
    hooked = resnet_trunk(depth=2)
    hooked.register_forward_hook(lambda *args: None)
    assert chain_of(hooked) == []  # its hook would not run on the parts
    fixed = ls.stream_plan(trunk, (2, 3, 320, 280), 160, memory_budget="64MiB")
    assert fixed.split is None and fixed.tile_size == (160, 160)  # an explicit tile is for the whole trunk


def test_a_region_read_in_another_dtype_counts_its_converted_copy():
    """A uint8 slide region becomes a float tile (the tile transform) before the trunk sees it:
    both are alive at once, so a forward plan for uint8 input must leave room for both (a
    51200² slide's forward tiles overran a 512 MiB budget fourfold when only the uint8
    region was counted)."""
    from lightning_streaming.core.memory import profile_tile

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 4, stride=4))
    raw = profile_tile(trunk, (1, 3, 32, 32), input_dtype=torch.uint8)
    same = profile_tile(trunk, (1, 3, 32, 32), input_dtype=torch.float32)
    assert same.input == 3 * 4 and raw.input == 3 * (1 + 4)
    shape = (1, 3, 4000, 3000)
    as_uint8 = ls.stream_plan(trunk, shape, memory_budget="64MiB", grad=False, input_dtype=torch.uint8)
    as_float = ls.stream_plan(trunk, shape, memory_budget="64MiB", grad=False, input_dtype=torch.float32)
    assert len(as_uint8.tiles) >= len(as_float.tiles)
    assert len(as_uint8.tiles) > 1
    region = 3 * (1 + 4) * math.prod(as_uint8.tiles.largest_region)  # the uint8 region and its float copy
    assert region < 64 * 2**20
