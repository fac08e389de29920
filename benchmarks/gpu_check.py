"""GPU readiness: CUDA peak memory and step time of the benchmark trunks, conventional
against streamed within half the conventional peak, in float32 and under autocast.

One process (CUDA's caching allocator makes per-measurement peaks exact:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, over the memory
allocated before the step). Per network, size and precision: a conventional training
step (trunk, then global mean pool + linear, forward and backward; batch 1) and a
streamed one with ``memory_budget`` = ``--budget-fraction`` of the conventional step's
peak (the meta-device estimate where conventional runs out of memory), each timed as the
median of ``--repeats`` steps after one warm-up, with the planner's plan. Stops starting
new measurements after ``--time-limit`` seconds. Run by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor

from bench_networks import NETWORK_LABELS, build, conventional_step_bytes

import lightning_streaming as ls

MiB = 2**20
PRECISIONS = {"float32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=["table1", "vgg", "resnet18", "resnet50"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16-mixed", "16-mixed"], choices=PRECISIONS)
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=360.0, help="seconds before no new measurement starts")
    return parser.parse_args(argv)


def timed_steps(step: Callable[[], Tensor], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median step seconds, peak MiB over the memory allocated before the step)."""
    step()  # warm-up: cuDNN's algorithm choice, the plan, the allocator's pool
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), (torch.cuda.max_memory_allocated(device) - before) / MiB


def measure(network: str, size: int, precision: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    trunk, head = build(network, 0, device)
    params = list(trunk.parameters()) + list(head.parameters())
    x = torch.randn(1, 3, size, size, device=device)
    dtype = PRECISIONS[precision]

    def step(forward: Callable[[Tensor], Any]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            for p in params:
                p.grad = None
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = head(forward(x).float())
            loss.backward()
            return loss

        return run

    row: dict[str, Any] = {"network": network, "size": size, "precision": precision}
    try:
        row["conv_s"], row["conv_mib"] = timed_steps(step(trunk), args.repeats, device)
        peak = row["conv_mib"] * MiB
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["conv_s"] = row["conv_mib"] = None
        peak = conventional_step_bytes(trunk, tuple(x.shape)) * (0.5 if dtype is not None else 1.0)
    budget = int(args.budget_fraction * peak)
    row["budget_mib"] = budget / MiB
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            plan = ls.stream_plan(trunk, tuple(x.shape), memory_budget=budget, activation_dtype=dtype, device=device)
    except ls.TileTooSmallError:
        row.update(plan="budget too small for any plan", predicted_mib=None, stream_s=None, stream_mib=None)
        return row
    row["plan"] = f"{'x'.join(map(str, plan.tile_size))}, grid {'x'.join(map(str, plan.tiles.grid))}, " \
                  f"keep {plan.keep_graphs}/{len(plan.tiles)}, batch {plan.tile_batch}"  # fmt: skip
    row["predicted_mib"] = plan.predicted_bytes / MiB
    try:
        row["stream_s"], row["stream_mib"] = timed_steps(step(lambda t: ls.stream(trunk, t, memory_budget=budget)),
                                                         args.repeats, device)  # fmt: skip
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["stream_s"] = row["stream_mib"] = None
    del trunk, head, x, params
    torch.cuda.empty_cache()
    return row


def _cell(value: float | None, digits: int = 2) -> str:
    return "OOM" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        message = "gpu_check: CUDA is not available (torch.cuda.is_available() is False); nothing to check"
        print(message, file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    started = time.perf_counter()
    print(f"# GPU check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda})\n")
    print("| network | image | precision | conventional step s | conventional peak MiB | budget MiB | plan "
          "| streamed step s | streamed peak MiB | predicted MiB | time s/c | memory s/c |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            continue
        for size in args.sizes:
            for network in args.networks:
                if time.perf_counter() - started > args.time_limit:
                    print(f"\n(stopped after {args.time_limit:.0f} s: --time-limit)")
                    return 0
                row = measure(network, size, precision, args, device)
                ratio = lambda a, b: _cell(row[a] / row[b] if row[a] and row[b] else None)  # noqa: E731
                print(
                    f"| {NETWORK_LABELS[network].split(' (')[0]} | {size}² | {precision} | {_cell(row['conv_s'], 3)} "
                    f"| {_cell(row['conv_mib'], 0)} | {row['budget_mib']:.0f} | {row['plan']} "
                    f"| {_cell(row['stream_s'], 3)} | {_cell(row['stream_mib'], 0)} | {_cell(row['predicted_mib'], 0)} "
                    f"| {ratio('stream_s', 'conv_s')} "
                    f"| {ratio('stream_mib', 'conv_mib')} |",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
