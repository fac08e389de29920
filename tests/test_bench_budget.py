"""Our own logic of benchmarks/budget_speed.py: the ResNet-50 body, the groups it runs,
the pairing of runs into ratios and the target verdicts (no benchmark is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_networks  # noqa: E402
import budget_report  # noqa: E402
import budget_speed  # noqa: E402


def test_resnet50_has_torchvisions_parameter_count_and_a_stride_32_body():
    net = bench_networks.ResNet50()
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    assert len(net.state_dict()) == 320
    trunk, head = bench_networks.build("resnet50", seed=0)
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not trunk.training and len(norms) == 53 and not any(p.requires_grad for m in norms for p in m.parameters())
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 128, 96))
    assert out.shape == (1, 2048, 4, 3) and head.linear.in_features == 2048


def test_groups_compare_every_mode_with_its_conventional_run_and_skip_what_does_not_fit():
    args = budget_speed.parse_args(["--configs", "table1:2048", "resnet50:4096", "--repeats", "3"])
    peaks = {("table1", 2048): {"fits": True, "train_mib": 3000.0, "inference_mib": 400.0},
             ("resnet50", 4096): {"fits": False, "train_mib": 30000.0, "inference_mib": 7000.0}}  # fmt: skip
    groups = {g.name: g for g in budget_speed.plan_groups(args, peaks)}
    modes = [s.mode for s in groups["main-table1-2048"].specs]
    assert modes == ["conventional", "budget", "per-tile", "streamed"]  # the defaults check at 2048²
    budget = groups["main-table1-2048"].specs[1].memory_budget
    assert budget == 1500 * 2**20 and groups["main-table1-2048"].repeats == 3
    assert [s.mode for s in groups["main-resnet50-4096"].specs] == ["budget", "per-tile"]  # conventional does not fit
    inference = groups["inference-table1-2048"].specs
    assert [s.grad for s in inference] == [False, False] and inference[1].memory_budget == 200 * 2**20


def result(mode: str, repeat: int, step: float, peak: float, **extra) -> dict:
    return dict(network="resnet18", height=2048, width=2048, tile_size=0, mode=mode, keep_graphs=0, role="main",
                group="main-resnet18-2048", repeat=repeat, step_s=step, forward_s=step / 3, peak_mib=peak,
                idle_mib=100.0, memory_budget=2**30, grid=[2, 2], n_tiles=4, **extra)  # fmt: skip


def test_ratios_pair_runs_of_one_repeat_and_verdicts_follow():
    runs = []
    for repeat, conv in enumerate((10.0, 20.0, 12.0)):
        runs += [result("conventional", repeat, conv, 2100.0), result("budget", repeat, conv * 0.9, 1100.0, plan_s=0.1),
                 result("per-tile", repeat, conv * 1.8, 1300.0)]  # fmt: skip
    rows = budget_report._rows(runs, "main")[("resnet18", 2048)]
    assert rows["budget"].time_ratios == [0.9, 0.9, 0.9]  # pairs cancel the repeat-to-repeat noise
    assert rows["budget"].ratio(rows["budget"].delta_ratios) == 0.5
    assert budget_report._paired(runs, "resnet18", 2048, "per-tile", "budget") == [2.0, 2.0, 2.0]
    lines = [v.line() for v in budget_report.verdicts(runs)]
    assert any("resnet18 2048² within half" in line and "MET" in line for line in lines)
    assert any("per-tile rule" in line and "2.00" in line and "MET" in line for line in lines)
