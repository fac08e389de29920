"""How long the analysis and the planners take, each measurement in a fresh process.

For each trunk (default: the ResNet-50 body, the largest of the benchmark trunks) a child
process times, in this order:

- *first plan*: ``ls.tile_plan`` on a new trunk: the analysis (the trunk run on fake
  tensors with symbolic sizes) and a tile plan; what a user's first step pays once;
- *new tile size*: ``tile_plan`` again with another tile size (analysis cached);
- *same structure*: ``tile_plan`` on a second instance of the trunk with other weights
  (the analysis is cached per structure, not per object);
- *budget plan*: ``ls.stream_plan(..., memory_budget=...)``: the memory-budget search
  (meta-device profile, cost model, every candidate plan) after the analysis.

Prints a markdown table of medians over the repeats (wall and CPU time of the process)
and writes it to ``<out-dir>/planning_time.md``.

    python benchmarks/planning_time.py [--networks resnet50 resnet18] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from child_process import run_measurement  # noqa: E402

RESULT_PREFIX = "PLANNING_TIME_RESULT "
STEPS = ("first plan", "new tile size", "same structure", "budget plan")


def child(network: str, size: int, tile: int, budget: str) -> dict[str, tuple[float, float]]:
    """Each step's (wall, CPU) seconds, in a process that has built nothing before."""
    import lightning_streaming as ls
    from bench_networks import NETWORKS

    shape = (1, 3, size, size)
    trunk, other = NETWORKS[network]().eval(), NETWORKS[network]().eval()
    calls = {
        "first plan": lambda: ls.tile_plan(trunk, shape, tile),
        "new tile size": lambda: ls.tile_plan(trunk, shape, tile - 64),
        "same structure": lambda: ls.tile_plan(other, shape, tile),
        "budget plan": lambda: ls.stream_plan(trunk, shape, memory_budget=budget),
    }
    times = {}
    for step, call in calls.items():
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        times[step] = (time.perf_counter() - wall, time.process_time() - cpu)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["resnet50"], choices=["table1", "vgg", "resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=2048, help="image side (default 2048)")
    parser.add_argument("--tile", type=int, default=1024, help="tile size of the tile plans (default 1024)")
    parser.add_argument("--budget", default="1GiB", help="memory budget of the budget plan (default 1GiB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--child", nargs=4, metavar=("NETWORK", "SIZE", "TILE", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        network, size, tile, budget = args.child
        print(RESULT_PREFIX + json.dumps(child(network, int(size), int(tile), budget)))
        return 0
    runs: dict[str, list[dict[str, list[float]]]] = {n: [] for n in args.networks}
    for repeat in range(args.repeats):
        for network in args.networks:  # interleaved: a noisy moment touches every network alike
            command = [sys.executable, __file__, "--child", network, str(args.size), str(args.tile), args.budget]
            result = run_measurement(command, RESULT_PREFIX, {"network": network}, 600, os.environ)
            if "error" in result:
                raise SystemExit(f"{network}: {result['error']}")
            runs[network].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {network}: {runs[network][-1]}", file=sys.stderr)
    lines = [
        f"# Planning time, each run a fresh process ({args.size}² image, tile {args.tile}, budget {args.budget}; "
        f"medians of {args.repeats}; wall s (CPU s); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "",
        "| trunk | " + " | ".join(STEPS) + " |",
        "|---|" + "---|" * len(STEPS),
    ]
    for network, samples in runs.items():
        cells = []
        for step in STEPS:
            wall = statistics.median(s[step][0] for s in samples)
            cpu = statistics.median(s[step][1] for s in samples)
            cells.append(f"{wall:.3f} ({cpu:.3f})")
        lines.append(f"| {network} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python benchmarks/planning_time.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "planning_time.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
