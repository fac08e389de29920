"""Memory and speed of streamed against conventional training, one fresh process per run.

What it measures: for the paper's Table I network (three 3x3 convolutions, 3 -> 64 -> 3
channels) and a VGG-like trunk (the first four blocks of the paper's Table III network),
one training step (trunk, then a tiny head: global mean pool + linear; forward and
backward; batch 1, float32, the image not requiring grad) run either conventionally or
with ``lightning_streaming.stream(trunk, x, tile_size)``. Per run it records the forward
and backward wall time (``time.perf_counter``) and the peak memory of the process
(``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), with the idle
baseline of the process (torch imported, model built, runtime initialised by a tiny
step, no image yet) so the step's own peak is ``peak - idle``.

Every run is a fresh child process (``--child``). Conventional and streamed runs of one
configuration alternate, ``--repeats`` times; tables show medians, and streamed /
conventional ratios are medians of the ratios of adjacent pairs, which cancels much of
the noise of a shared machine. A conventional run is skipped when its estimated memory
(saved activations from a meta-device trace) exceeds ``--skip-conventional-above`` GiB.

Also: a ``keep_graphs`` sweep (0 .. number of tiles) at ``--sweep-size``, the time/memory
trade-off curve; and the issue's memory bound for streaming at the largest size:
idle + input + output + output gradient + one tile's conventional step, the latter
measured by a conventional run at the plan's largest tile region.

Run from the repository root (the package must be importable, e.g. installed with
``pip install -e .`` or via ``PYTHONPATH=.``)::

    python benchmarks/memory_speed.py --quick          # smoke run, 1024² and 2048², 1 repeat
    python benchmarks/memory_speed.py                  # full run (tens of minutes on 2 cores)
    python benchmarks/memory_speed.py --replot         # redo tables/plots from the saved JSON

Writes ``<out-dir>/memory_speed.md``, ``memory_speed.json`` (every run),
``memory_vs_size.png`` and ``keep_graphs_tradeoff.png``; prints the tables to stdout and
progress to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import bench_report as report
from bench_child import RESULT_PREFIX, RunSpec, child_main
from bench_networks import NETWORKS, build, conventional_step_bytes
from child_process import run_measurement
from driver import run_driver

import lightning_streaming as ls

log = logging.getLogger("memory_speed")
GiB = 2**30
DEFAULT_SIZES = (1024, 2048, 4096, 8192)
QUICK_SIZES = (1024, 2048)


@dataclass(frozen=True)
class Group:
    """Runs that alternate with each other, ``repeats`` times; ratios pair within a repeat."""

    name: str
    role: str  # "main", "sweep" or "tile-reference"
    specs: tuple[RunSpec, ...]
    repeats: int
    for_size: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="image sides (pixels)")
    parser.add_argument("--tile-size", type=int, default=1024, help="streaming tile size, input pixels, halo included")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=["table1", "vgg"])
    parser.add_argument("--repeats", type=int, default=3, help="repeats for sizes <= --small-size (default 3)")
    parser.add_argument("--repeats-large", type=int, default=1, help="repeats above --small-size (default 1)")
    parser.add_argument("--small-size", type=int, default=2048, help="largest size counted as small (default 2048)")
    parser.add_argument(
        "--warmup-max-size",
        type=int,
        default=1024,
        help="run one untimed full-size warm-up step up to this size (default 1024); larger runs are only "
        "primed by a tiny step before the baseline",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument(
        "--skip-conventional-above",
        type=float,
        default=20.0,
        help="skip a conventional run whose estimated memory exceeds this many GiB (default 20)",
    )
    parser.add_argument("--force-conventional", action="store_true", help="run conventional at every size")
    parser.add_argument("--no-conventional", action="store_true", help="run no conventional step (streamed only)")
    parser.add_argument(
        "--vgg-max-size",
        type=int,
        default=4096,
        help="largest size for the VGG-like trunk (default 4096: its streamed 8192² step takes over 10 minutes "
        "on 2 CPU cores); pass 8192 to include it",
    )
    parser.add_argument("--keep-graphs-sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sweep-size", type=int, default=2048, help="image side of the keep_graphs sweep")
    parser.add_argument(
        "--sweep-repeats", type=int, default=1, help="repeats of keep_graphs >= 1 in the sweep (default 1)"
    )
    parser.add_argument("--bound-size", type=int, default=None, help="size of the memory-bound check (default: largest)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the runs: allocations above it bypass the heap, so RSS tracks "
        "live tensors instead of heap fragmentation (default: the allocator's own dynamic threshold)",
    )
    parser.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a run is abandoned")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1024² and 2048², 1 repeat, sweep at 1024²")
    parser.add_argument("--replot", action="store_true", help="only redo tables and plots from <out-dir>/memory_speed.json")
    parser.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.sizes, args.repeats, args.repeats_large, args.sweep_size = list(QUICK_SIZES), 1, 1, 1024
    args.sizes = sorted(set(args.sizes))
    if args.bound_size is None:
        args.bound_size = max(args.sizes)
    return args


def repeats_for(size: int, args: argparse.Namespace) -> int:
    return args.repeats if size <= args.small_size else args.repeats_large


def conventional_decision(network: str, size: int, args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to run conventional at ``size``, and why not."""
    if args.no_conventional:
        return False, "skipped (--no-conventional)"
    trunk, _ = build(network, args.seed)
    estimate = conventional_step_bytes(trunk, (1, 3, size, size)) / GiB
    if args.force_conventional or estimate <= args.skip_conventional_above:
        return True, ""
    return False, f"skipped: estimated {estimate:.1f} GiB > {args.skip_conventional_above:g} GiB"


def spec(args: argparse.Namespace, network: str, mode: str, size: int | tuple[int, int], keep_graphs: int = 0) -> RunSpec:
    height, width = (size, size) if isinstance(size, int) else size
    return RunSpec(
        network=network,
        mode=mode,
        height=height,
        width=width,
        tile_size=args.tile_size,
        keep_graphs=keep_graphs,
        full_warmup=max(height, width) <= args.warmup_max_size,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
    )


def plan_groups(args: argparse.Namespace) -> tuple[list[Group], list[dict[str, Any]]]:
    """The groups to run, and the conventional runs skipped (for the table)."""
    groups: list[Group] = []
    skipped: list[dict[str, Any]] = []
    for network in args.networks:
        sizes = [s for s in args.sizes if network != "vgg" or s <= args.vgg_max_size]
        for size in sizes:
            run_conventional, reason = conventional_decision(network, size, args)
            conventional = (spec(args, network, "conventional", size),) if run_conventional else ()
            if not run_conventional:
                skipped.append({"network": network, "height": size, "tile_size": args.tile_size,
                                "mode": "conventional", "reason": reason})  # fmt: skip
            streamed = spec(args, network, "streamed", size)
            groups.append(Group(f"main-{network}-{size}", "main", conventional + (streamed,), repeats_for(size, args), size))
            if args.keep_graphs_sweep and size == args.sweep_size:
                groups += sweep_groups(args, network, size, conventional)
            if size == args.bound_size:
                groups.append(tile_reference_group(args, network, size))
    return groups, skipped


def sweep_groups(args: argparse.Namespace, network: str, size: int, conventional: tuple[RunSpec, ...]) -> list[Group]:
    """Streamed with keep_graphs 1 .. number of tiles (0 is in the main group), each paired
    with its own conventional run, so a change of machine load mid-sweep cannot bias it."""
    trunk, _ = build(network, args.seed)
    tiles = len(ls.tile_plan(trunk, (1, 3, size, size), args.tile_size))
    return [
        Group(f"sweep-{network}-{size}-k{k}", "sweep", conventional + (spec(args, network, "streamed", size, k),),
              args.sweep_repeats, size)
        for k in range(1, tiles + 1)
    ]  # fmt: skip


def tile_reference_group(args: argparse.Namespace, network: str, size: int) -> Group:
    """A conventional run at the largest tile region of the streamed plan at ``size``."""
    trunk, _ = build(network, args.seed)
    region = ls.tile_plan(trunk, (1, 3, size, size), args.tile_size).largest_region
    reference = spec(args, network, "conventional", (region[0], region[1]))
    return Group(f"tile-reference-{network}-{size}", "tile-reference", (reference,), repeats_for(max(region), args), size)


def child_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return env


def run_child(run: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``run`` in a fresh interpreter; on failure, a result with ``error``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", run.to_json()]
    return run_measurement(command, RESULT_PREFIX, asdict(run), args.child_timeout, child_environment(args))


def describe(run: RunSpec) -> str:
    extra = f" keep_graphs={run.keep_graphs}" if run.mode == "streamed" else ""
    return f"{run.network} {run.height}x{run.width} {run.mode}{extra}"


def failure_label(result: dict[str, Any]) -> str:
    return f"{result['network']} {result['height']}x{result['width']} {result['mode']} keep_graphs={result['keep_graphs']}"


def run_groups(groups: list[Group], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every group, alternating the order of its runs between repeats."""
    total = sum(len(g.specs) * g.repeats for g in groups)
    results: list[dict[str, Any]] = []
    for group in groups:
        for repeat in range(group.repeats):
            order = group.specs if repeat % 2 == 0 else tuple(reversed(group.specs))
            for run in order:
                started = time.perf_counter()
                result = run_child(run, args)
                result |= {"group": group.name, "role": group.role, "repeat": repeat, "for_size": group.for_size}
                results.append(result)
                log_progress(len(results), total, run, result, time.perf_counter() - started)
    return results


def log_progress(done: int, total: int, run: RunSpec, result: dict[str, Any], wall: float) -> None:
    if "error" in result:
        log.warning("[%d/%d] %s FAILED: %s", done, total, describe(run), result["error"])
        return
    log.info(
        "[%d/%d] %s: step %.2f s (fwd %.2f, bwd %.2f), peak %.0f MiB (idle %.0f), load %.1f, %.0f s wall",
        done, total, describe(run), result["step_s"], result["forward_s"], result["backward_s"],
        result["peak_mib"], result["idle_mib"], result["load_1min"], wall,
    )  # fmt: skip


def render(results: list[dict[str, Any]], skipped: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown report."""
    rows = report.aggregate(results)
    sweep_rows = report.aggregate(results, roles=("main", "sweep"))
    networks = [n for n in args.networks if any(r.get("network") == n for r in results)]
    failures = [r for r in results if "error" in r]
    at_bound = [n for n in networks if any(r.get("network") == n and r["height"] == args.bound_size for r in results)]
    verdicts = [report.bound_verdict(rows, results, n, args.bound_size, args.tile_size) for n in at_bound]
    verdicts += [report.saving_verdict(rows, "table1", 4096, args.tile_size)] if "table1" in networks else []
    verdicts += [report.time_verdict(rows, n, 2048, args.tile_size) for n in networks]
    device = next((f"{r['memory_source']}, torch {r['torch']}, {r['threads']} threads" for r in results if "torch" in r), "")
    parts = [
        "# Memory and speed: streamed vs conventional training step",
        f"Device {args.device} ({device}); batch 1, float32; tile size {args.tile_size} (input pixels, halo "
        "included); head: global mean pool + linear. Medians over runs, each run a fresh process; ratios "
        "streamed/conventional (s/c) are medians of adjacent-pair ratios; *load* is the machine's 1-minute load "
        "average after the step (2 cores; above ~2 other processes competed for them). *idle* = process with torch, model and "
        "runtime initialised (a tiny 64² step), before the image exists. Warm-up: *full step* = one untimed "
        f"full-size step first (sizes ≤ {args.warmup_max_size}); *tiny step* = only the priming step. MiB = 2²⁰ bytes."
        + (f" glibc MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}." if args.malloc_mmap_threshold else ""),
        "## Runs (keep_graphs = 0)",
        report.main_table(rows, skipped),
        "## Targets",
        "\n".join(v.line() for v in verdicts),
    ]
    if args.keep_graphs_sweep:
        parts += [
            f"## keep_graphs trade-off at {args.sweep_size}², tile {args.tile_size}",
            "keep_graphs = k keeps the last k tiles' graphs from the forward (no recompute for them). "
            f"k = 0 from the main runs; k ≥ 1 {args.sweep_repeats} run(s) each, each paired with its own adjacent "
            "conventional run (the conventional row is the median of all of them).",
            report.sweep_table(sweep_rows, networks, args.sweep_size, args.tile_size),
        ]
    if failures:
        parts += ["## Failed runs", "\n".join(f"- {failure_label(r)}: {r['error']}" for r in failures)]
    parts.append(f"Command: `python benchmarks/memory_speed.py {' '.join(args.argv)}`")
    return "\n\n".join(parts) + "\n"


def write_outputs(results: list[dict[str, Any]], skipped: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render(results, skipped, args)
    (args.out_dir / "memory_speed.md").write_text(markdown)
    report.plot_memory_vs_size(report.aggregate(results), args.out_dir / "memory_vs_size.png")
    if args.keep_graphs_sweep:
        report.plot_tradeoff(report.aggregate(results, roles=("main", "sweep")), args.networks, args.sweep_size, args.tile_size, args.out_dir / "keep_graphs_tradeoff.png")
    print(markdown)


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    groups, skipped = plan_groups(args)
    log.info("%d groups, %d runs", len(groups), sum(len(g.specs) * g.repeats for g in groups))
    return {"results": run_groups(groups, args), "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> int:
    return run_driver(
        argv, parse_args, "memory_speed", child_main, measure_all,
        lambda saved, args: write_outputs(saved["results"], saved["skipped"], args),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
