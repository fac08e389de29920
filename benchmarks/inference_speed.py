"""Inference speed: streamed no-grad forward against the conventional forward, one fresh
process per run.

What it measures: for the VGG-like trunk (the first four blocks of the paper's Table III
network) and the ResNet-18 body (conv1 .. layer4, eval-mode BatchNorm), the trunk's forward
under ``torch.no_grad()`` on one ``--size``² float32 image (batch 1), run either
conventionally (``trunk(x)``) or streamed (``lightning_streaming.stream(trunk, x,
tile_size)``, as ``ls.predict_slide`` runs it: no graph is kept, so tiles may be larger
than in training) for each ``--tiles`` size; ``auto:BUDGET`` is the plan ``ls.predict_slide``
follows within that memory budget (``stream(memory_budget=...)``: the core's planner, which
may stream only the trunk's first children and run the rest whole; ``auto``: inference's
default budget, a quarter of the memory available). Per run: the wall time of the forward
(``time.perf_counter``), the throughput in megapixels per second, and the peak resident
memory of the process (``ru_maxrss``) over its idle baseline (torch imported, trunk built,
runtime primed by a tiny forward, no image yet).

Every run is a fresh child process (``--child``); the runs of one network alternate in a
rotated order, ``--repeats`` times. The table shows medians, and each streamed
configuration's throughput relative to the conventional forward as the median of the
ratios to the conventional run of the same repeat (neighbours in time, so machine load
partly cancels), by wall time and by the process's CPU time (``time.process_time``: the
work done, which other jobs on a shared machine disturb far less than the wall time).
The target: streamed throughput at least 0.9x the conventional one.

    python benchmarks/inference_speed.py                 # 4096², tiles 2048 auto:2GiB auto:1GiB auto, 3 repeats (~10 min, 2 cores)
    python benchmarks/inference_speed.py --quick         # 1024², 1 repeat: a smoke run

Writes ``<out-dir>/inference_speed.md`` and ``inference_speed.json`` (default
``results/benchmarks``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from child_process import run_measurement

RESULT_PREFIX = "INFERENCE_SPEED_RESULT "
NETWORKS = ("vgg", "resnet18")
log = logging.getLogger("inference_speed")


@dataclass(frozen=True)
class Run:
    network: str
    size: int
    tile: str | None  # None: conventional; a size, or "auto[:BUDGET]"
    seed: int = 0
    threads: int | None = None


def child(spec_json: str) -> int:
    """Build, prime, time one no-grad forward; print the result line."""
    import torch

    import lightning_streaming as ls
    from bench_child import MemoryProbe
    from bench_networks import build

    run = Run(**json.loads(spec_json))
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    trunk, _ = build(run.network, run.seed)
    trunk.eval()
    shape = (1, 3, run.size, run.size)
    tile: Any = None if run.tile is None else int(run.tile) if run.tile.isdigit() else "auto"
    options = {} if tile != "auto" else {"memory_budget": _budget(run.tile)}
    forward = trunk if tile is None else (lambda x: ls.stream(trunk, x, tile, **options))
    probe = MemoryProbe(torch.device("cpu"))
    with torch.no_grad():
        forward(torch.randn(1, 3, 64, 64))  # threads, kernels and (streamed) the trunk's analysis
        idle = probe.current_mib()
        x = torch.randn(1, 3, run.size, run.size, generator=torch.Generator().manual_seed(run.seed + 1))
        plan = None if tile is None else ls.stream_plan(trunk, tuple(x.shape), tile, grad=False, **options)
        tiles = 1 if plan is None else len(plan.tiles)
        start, cpu = time.perf_counter(), time.process_time()
        out = forward(x)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    result = asdict(run) | {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "megapixels_per_s": run.size**2 / seconds / 1e6,
        "tiles": tiles,
        "tile_size": None if plan is None else plan.tile_size,
        "split": None if plan is None or plan.split is None else plan.split[1],
        "output_shape": list(out.shape),
        "idle_mib": idle,
        "peak_mib": probe.peak_mib(),
        "load_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def _budget(spec: str) -> int:
    """The bytes of ``auto[:BUDGET]``; plain ``auto``: inference's default budget."""
    from lightning_streaming.core import parse_bytes
    from lightning_streaming.inference.tiles import default_memory_budget

    return parse_bytes(spec.partition(":")[2]) if ":" in spec else default_memory_budget()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    parser.add_argument("--tiles", nargs="+", default=["2048", "auto:2GiB", "auto:1GiB", "auto"],
                        help="streamed tile sizes, or auto[:BUDGET] (default: 2048 auto:2GiB auto:1GiB auto)")  # fmt: skip
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is abandoned")
    parser.add_argument("--quick", action="store_true", help="1024², tiles 512 1024, 1 repeat")
    parser.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.tiles, args.repeats = 1024, ["512", "auto"], 1
    return args


def measure(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(run))]
    return run_measurement(command, RESULT_PREFIX, asdict(run), args.timeout, dict(os.environ))


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ok = [r for r in results if "error" not in r]
    lines = [
        f"No-grad trunk forward on one {args.size}² float32 image (batch 1), each run a fresh process; medians of "
        f"{args.repeats} interleaved repeats. Relative throughput: median over repeats of streamed / conventional "
        "throughput within a repeat (target ≥ 0.9). Memory: peak RSS over the idle process.",
        "",
        "| trunk | forward | tiles | time s | Mpx/s | throughput ÷ conventional (wall) | CPU s | throughput ÷ "
        "conventional (CPU time) | peak − idle MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for network in args.networks:
        conventional = {r["repeat"]: r for r in ok if r["network"] == network and r["tile"] is None}
        for tile in [None, *args.tiles]:
            runs = [r for r in ok if r["network"] == network and r["tile"] == tile]
            if not runs:
                continue
            relative = [_relative(conventional, runs, key, tile) for key in ("seconds", "cpu_seconds")]
            name = "conventional" if tile is None else f"streamed, tile {tile}"
            if tile is not None and not tile.isdigit():
                split = runs[0].get("split")
                name += f" (= {runs[0]['tile_size']}" + (f", children to {split} streamed" if split else "") + ")"
            lines.append(
                f"| {network} | {name} | {runs[0]['tiles']} "
                f"| {statistics.median(r['seconds'] for r in runs):.2f} "
                f"| {statistics.median(r['megapixels_per_s'] for r in runs):.2f} | {relative[0]} "
                f"| {statistics.median(r['cpu_seconds'] for r in runs):.1f} | {relative[1]} "
                f"| {statistics.median(r['peak_mib'] - r['idle_mib'] for r in runs):.0f} "
                f"| {statistics.median(r['load_1min'] for r in runs):.1f} |"
            )
    failures = [f"- {r['network']} tile {r['tile']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines + (["", "Failed runs:", *failures] if failures else []))


def _relative(conventional: dict[int, dict[str, Any]], runs: list[dict[str, Any]], key: str, tile: str | None) -> str:
    """Median over repeats of conventional time / streamed time (throughput ratio)."""
    if tile is None:
        return "1"
    ratios = [conventional[r["repeat"]][key] / r[key] for r in runs if r["repeat"] in conventional]
    return f"**{statistics.median(ratios):.2f}**" if ratios else "–"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child(args.child)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    results = []
    for network in args.networks:
        runs = [Run(network, args.size, tile, threads=args.threads) for tile in [None, *args.tiles]]
        for repeat in range(args.repeats):
            shift = repeat % len(runs)
            for run in runs[shift:] + runs[:shift]:  # rotated order: no configuration always runs first
                result = measure(run, args) | {"repeat": repeat}
                results.append(result)
                if "error" in result:
                    log.warning("%s tile %s failed: %s", network, run.tile, result["error"])
                else:
                    log.info("%s tile %s: %.2f s (CPU %.1f s), %.2f Mpx/s, peak %.0f MiB (idle %.0f), load %.1f", network,
                             run.tile, result["seconds"], result["cpu_seconds"], result["megapixels_per_s"],
                             result["peak_mib"], result["idle_mib"], result["load_1min"])  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "inference_speed.json").write_text(json.dumps(results, indent=1))
    markdown = "# Inference speed: streamed vs conventional no-grad forward\n\n" + table(results, args) + "\n"
    (args.out_dir / "inference_speed.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
