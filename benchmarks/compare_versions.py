"""Has streaming itself become slower? The same streamed training step with this checkout
and another one (e.g. ``git worktree add /tmp/before <commit>``), side by side with the
conventional step, interleaved, each run a fresh process.

Each side runs its own ``benchmarks/memory_speed.py --child`` with its own package
(``PYTHONPATH``), so the comparison is of the code, not of the machine's moment: within a
repeat the three runs are adjacent and their order alternates, and each streamed step is
reported as a ratio to the conventional step of the same repeat. Prints a table of
medians and writes ``<out-dir>/compare_versions.md``.

    git worktree add /tmp/before d22fb7b
    python benchmarks/compare_versions.py /tmp/before --networks table1 vgg --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from child_process import run_measurement  # noqa: E402

RESULT_PREFIX = "MEMORY_SPEED_RESULT "


def measure(root: Path, network: str, mode: str, args: argparse.Namespace) -> dict:
    spec = {
        "network": network, "mode": mode, "height": args.size, "width": args.size,
        "tile_size": args.size if mode == "conventional" else args.tile_size,
        "keep_graphs": args.keep_graphs if mode == "streamed" else 0, "full_warmup": False, "device": "cpu",
        "seed": 0, "threads": args.threads,
    }  # fmt: skip
    command = [sys.executable, str(root / "benchmarks" / "memory_speed.py"), "--child", json.dumps(spec)]
    return run_measurement(command, RESULT_PREFIX, spec, args.timeout, dict(os.environ, PYTHONPATH=str(root)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (its benchmarks/ and lightning_streaming/)")
    parser.add_argument("--networks", nargs="+", default=["table1", "vgg"])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--keep-graphs", type=int, default=1, help="stream()'s default: 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    sides = {"this": HERE.parent, "other": args.other.resolve()}
    rows: list[dict] = []
    for network in args.networks:
        for repeat in range(args.repeats):
            order = [("this", "conventional"), ("other", "streamed"), ("this", "streamed")]
            for side, mode in order if repeat % 2 == 0 else order[::-1]:
                result = measure(sides[side], network, mode, args)
                result.update(side=side if mode == "streamed" else "conventional", repeat=repeat)
                rows.append(result)
                print(f"{network} repeat {repeat + 1}: {result['side']:12s} "
                      f"{result.get('step_s', float('nan')):.2f} s, peak − idle "
                      f"{result.get('peak_mib', 0) - result.get('idle_mib', 0):.0f} MiB, load "
                      f"{result.get('load_1min', 0):.1f} {result.get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
    lines = [
        f"# The streamed step, this checkout against {args.other} ({args.size}², tile {args.tile_size}, "
        f"keep_graphs={args.keep_graphs}; medians of {args.repeats} interleaved repeats, fresh processes)",
        "",
        "| network | conventional step | streamed step (other) | time s/c (other) | streamed step (this) "
        "| time s/c (this) | this / other |",
        "|---|---|---|---|---|---|---|",
    ]
    for network in args.networks:
        steps: dict[str, list[float]] = {"conventional": [], "other": [], "this": []}
        ratios: dict[str, list[float]] = {"other": [], "this": []}
        for repeat in range(args.repeats):
            got = {r["side"]: r.get("step_s") for r in rows if r["network"] == network and r["repeat"] == repeat}
            for side, step in got.items():
                if step is not None:
                    steps[side].append(step)
            for side in ratios:
                if got.get(side) and got.get("conventional"):
                    ratios[side].append(got[side] / got["conventional"])
        med = {k: statistics.median(v) if v else float("nan") for k, v in steps.items()}
        rat = {k: statistics.median(v) if v else float("nan") for k, v in ratios.items()}
        lines.append(
            f"| {network} | {med['conventional']:.2f} s | {med['other']:.2f} s | {rat['other']:.2f} | "
            f"{med['this']:.2f} s | {rat['this']:.2f} | {med['this'] / med['other']:.2f} |"
        )
    lines += ["", "Command: `python benchmarks/compare_versions.py " + " ".join(argv or sys.argv[1:]) + "`"]
    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "compare_versions.md").write_text(table + "\n")
    (args.out_dir / "compare_versions.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
