"""Speed within a memory budget: conventional against streamed with the planner, one fresh process per run.

For each network and image size, a training step (trunk, then global mean pool + linear;
batch 1; float32; the image not requiring grad) runs:

- ``conventional``: the plain trunk;
- ``budget``: ``stream(trunk, x, memory_budget=B)``, the planner choosing tile size, kept
  graphs and tile batching, with ``B`` = ``--budget-fraction`` (default 0.5) of the
  conventional step's peak over the idle process;
- ``per-tile``: the rule ``tile_size="auto"`` followed before the planner, for the same
  number: the largest square tile whose working set fits ``B``, ``keep_graphs=1``;
- ``streamed`` (Table I and VGG-like at ``--defaults-size``): the defaults, tile
  ``--tile-size`` and ``keep_graphs=1``, to check they did not regress.

The conventional peak comes from a first, separate conventional run per configuration
(role ``calibration``); where the conventional step would not fit
(``--skip-conventional-above`` GiB by the meta-device estimate) the estimate stands in
for it and no conventional run is made. The runs of a configuration then alternate, in
reversed order every other repeat, ``--repeats`` times; ratios are medians of the ratios
of runs made next to each other.

Inference (no grad): a conventional forward against the planner with ``grad=False`` and
a budget of ``--budget-fraction`` of the conventional forward's peak, reported as
megapixels per second.

    python benchmarks/budget_speed.py --quick     # smoke run: 1024², 1 repeat (minutes)
    python benchmarks/budget_speed.py             # the full run (about two hours on 2 cores)
    python benchmarks/budget_speed.py --replot    # tables and plot from the saved JSON

Writes ``<out-dir>/budget_speed.md``, ``budget_speed.json`` and ``budget_speed.png``
(default out-dir ``results/budget``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import budget_report as report
from bench_child import RunSpec, child_main
from bench_networks import NETWORKS, build, conventional_step_bytes
from driver import run_driver
from memory_speed import Group, log_progress, run_child, run_groups

log = logging.getLogger("budget_speed")
GiB, MiB = 2**30, 2**20
DEFAULT_CONFIGS = ("table1:2048", "vgg:2048", "resnet18:2048", "resnet50:2048", "resnet18:4096", "resnet50:4096")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="network:size pairs")
    parser.add_argument("--budget-fraction", type=float, default=0.5, help="budget over the conventional peak")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--defaults-size", type=int, default=2048, help="size of the default-settings check")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile size of the default-settings check")
    parser.add_argument("--skip-conventional-above", type=float, default=16.0, help="GiB, by the meta estimate")
    parser.add_argument("--warmup-max-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-timeout", type=float, default=3600.0)
    parser.add_argument("--out-dir", type=Path, default=Path("results/budget"))
    parser.add_argument("--quick", action="store_true", help="smoke run: every network at 1024², 1 repeat")
    parser.add_argument("--replot", action="store_true")
    parser.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.configs, args.repeats, args.defaults_size = [f"{n}:1024" for n in NETWORKS], 1, 1024
    args.configs = [parse_config(c) for c in args.configs]
    return args


def parse_config(text: str) -> tuple[str, int]:
    network, _, size = text.partition(":")
    if network not in NETWORKS or not size.isdigit():
        raise SystemExit(f"--configs takes network:size with a network of {sorted(NETWORKS)}, got {text!r}")
    return network, int(size)


def spec(args: argparse.Namespace, network: str, size: int, mode: str, **fields: Any) -> RunSpec:
    return RunSpec(
        network=network, mode=mode, height=size, width=size, tile_size=fields.pop("tile_size", size),
        full_warmup=size <= args.warmup_max_size, device=args.device, seed=args.seed, threads=args.threads,
        dtype=args.dtype, **fields,
    )  # fmt: skip


def calibrate(args: argparse.Namespace) -> tuple[dict[tuple[str, int], dict[str, Any]], list[dict[str, Any]]]:
    """Per configuration, the conventional peaks (training and inference) the budgets are
    fractions of: measured by a conventional run, or estimated where it would not fit."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    for network, size in args.configs:
        trunk, _ = build(network, args.seed)
        estimate = conventional_step_bytes(trunk, (1, 3, size, size))
        entry: dict[str, Any] = {"estimate_mib": estimate / MiB, "fits": estimate / GiB <= args.skip_conventional_above}
        for grad in (True, False) if args.inference else (True,):
            if entry["fits"]:
                started = time.perf_counter()
                result = run_child(spec(args, network, size, "conventional", grad=grad), args)
                result |= {"group": f"calibration-{network}-{size}", "role": "calibration", "repeat": 0}
                result["for_size"] = size
                results.append(result)
                wall = time.perf_counter() - started
                total = len(args.configs) * 2
                log_progress(len(results), total, spec(args, network, size, "conventional"), result, wall)
                peak = result["peak_mib"] - result["idle_mib"] if "error" not in result else estimate / MiB
            else:
                peak = estimate / MiB if grad else estimate / MiB / 4  # no inference run to measure
            entry["train_mib" if grad else "inference_mib"] = peak
        found[(network, size)] = entry
    return found, results


def plan_groups(args: argparse.Namespace, peaks: dict[tuple[str, int], dict[str, Any]]) -> list[Group]:
    groups = []
    for network, size in args.configs:
        entry = peaks[(network, size)]
        budget = int(args.budget_fraction * entry["train_mib"] * MiB)
        conventional = (spec(args, network, size, "conventional"),) if entry["fits"] else ()
        specs = conventional + (
            spec(args, network, size, "budget", memory_budget=budget, tile_size=0),
            spec(args, network, size, "per-tile", memory_budget=budget, keep_graphs=1, tile_size=0),
        )
        if network in ("table1", "vgg") and size == args.defaults_size:
            specs += (spec(args, network, size, "streamed", tile_size=args.tile_size, keep_graphs=1),)
        groups.append(Group(f"main-{network}-{size}", "main", specs, args.repeats, size))
        if args.inference:
            budget = int(args.budget_fraction * entry["inference_mib"] * MiB)
            specs = conventional and (spec(args, network, size, "conventional", grad=False),)
            specs += (spec(args, network, size, "budget", memory_budget=budget, tile_size=0, grad=False),)
            groups.append(Group(f"inference-{network}-{size}", "inference", specs, args.repeats, size))
    return groups


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    peaks, results = calibrate(args)
    groups = plan_groups(args, peaks)
    log.info("%d groups, %d runs", len(groups), sum(len(g.specs) * g.repeats for g in groups))
    results += run_groups(groups, args)
    return {"results": results, "peaks": [{"network": n, "size": s, **v} for (n, s), v in peaks.items()]}


def main(argv: Sequence[str] | None = None) -> int:
    return run_driver(
        argv, parse_args, "budget_speed", child_main, measure_all,
        lambda saved, args: write_outputs(saved["results"], saved["peaks"], args),
    )  # fmt: skip


def write_outputs(results: list[dict[str, Any]], peaks: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = report.render(results, peaks, args)
    (args.out_dir / "budget_speed.md").write_text(markdown)
    report.plot(results, args.out_dir / "budget_speed.png")
    print(markdown)


if __name__ == "__main__":
    sys.exit(main())
