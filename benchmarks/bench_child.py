"""One measurement in a fresh process: build, baseline, (warm up), time one training step.

The parent runs ``memory_speed.py --child SPEC_JSON``; the child prints one line,
``RESULT_PREFIX`` followed by the result as JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

import lightning_streaming as ls
from bench_networks import Head, build
from vs_common import Memory

RESULT_PREFIX = "MEMORY_SPEED_RESULT "
PRIMING_SIZE = 64  # pixels per side of the tiny step that initialises the runtime before the baseline
MiB = 2**20


@dataclass(frozen=True)
class RunSpec:
    """What one child process measures.

    Modes: ``conventional``; ``streamed`` (``tile_size`` and ``keep_graphs`` as given);
    ``budget`` (``stream(memory_budget=...)``: the planner chooses); ``per-tile`` (the
    rule ``tile_size="auto"`` followed before the planner: the largest tile whose working
    set fits ``memory_budget``, ``keep_graphs=1``). ``grad=False`` times a forward without
    grad (inference) instead of a training step.
    """

    network: str
    mode: str
    height: int
    width: int
    tile_size: int
    keep_graphs: int = 0
    full_warmup: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    memory_budget: int | None = None  # bytes, for the "budget" and "per-tile" modes
    grad: bool = True
    dtype: str = "float32"  # or "bfloat16"/"float16": autocast, as Lightning's "-mixed" precisions

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


class MemoryProbe:
    """Peak memory of the process (CPU: the kernel's high-water mark of resident memory,
    ``VmHWM``, via vs_common's ``Memory``; CUDA: ``max_memory_allocated``).

    Not ``ru_maxrss``: Linux keeps the larger of it and the parent's resident memory at
    ``fork`` across ``exec``, so a child of a driver that built large models reported the
    driver's memory as its own idle baseline."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device
        self.resident = None if self.cuda else Memory()

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / MiB
        return self.resident.peak_mib()

    def current_mib(self) -> float:
        """Memory in use now (the baseline): CUDA allocated bytes, or the resident memory."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / MiB
        return self.resident.current_mib()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def make_step(spec: RunSpec, trunk: nn.Module, tile_size: int) -> Callable[[Tensor], Tensor]:
    """The trunk's forward in ``spec.mode`` (``tile_size``: the resolved one)."""
    if spec.mode == "conventional":
        return trunk
    if spec.mode in ("streamed", "per-tile"):
        return lambda x: ls.stream(trunk, x, tile_size, keep_graphs=spec.keep_graphs)
    if spec.mode == "budget":
        return lambda x: ls.stream(trunk, x, memory_budget=spec.memory_budget)
    raise ValueError(f"unknown mode {spec.mode!r}")


def training_step(
    forward: Callable[[Tensor], Tensor], head: Head, params: list[nn.Parameter], x: Tensor, probe: MemoryProbe,
    grad: bool = True,
) -> tuple[float, float]:
    """One forward and backward of trunk + head (with ``grad`` False: one forward without
    grad, and 0 for the backward); returns (forward s, backward s)."""
    for p in params:
        p.grad = None
    probe.synchronize()
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        loss = head(forward(x))
    probe.synchronize()
    middle = time.perf_counter()
    if grad:
        loss.backward()
    probe.synchronize()
    return middle - start, time.perf_counter() - middle


def plan_info(trunk: nn.Module, shape: tuple[int, ...], tile_size: int) -> dict[str, Any]:
    """The tile plan for ``shape`` (computing it also caches it, as in a training loop);
    ``halo_factor`` is the pixels the tiles' regions cover over the image's pixels."""
    start = time.perf_counter()
    plan = ls.tile_plan(trunk, shape, tile_size)
    plan_s = time.perf_counter() - start
    return {"plan_s": plan_s} | _tiles_info(plan, shape)


def _tiles_info(plan: ls.TilePlan, shape: tuple[int, ...]) -> dict[str, Any]:
    region_pixels = sum(math.prod(s.size for s in tile) for tile in plan)
    return {
        "halo_factor": region_pixels / math.prod(shape[2:]),
        "grid": list(plan.grid),
        "n_tiles": len(plan),
        "largest_region": list(plan.largest_region),
        "output_shape": list(plan.output_shape),
    }


def budget_plan_info(spec: RunSpec, trunk: nn.Module, shape: tuple[int, ...], device: torch.device) -> dict[str, Any]:
    """What the mode chose for ``shape`` within ``spec.memory_budget``, timed (the planner's
    plan is cached, so the timed step does not plan again). ``analysis_s`` is the trunk's
    analysis (once per trunk structure, for every mode), ``plan_s`` the choice after it."""
    start = time.perf_counter()
    ls.tile_plan(trunk, shape, max(shape[2:]))
    analysis_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    if spec.mode == "per-tile":
        tile = ls.auto_tile_size(trunk, shape, spec.memory_budget, activation_dtype=_autocast_dtype(spec))
        plan_s, plan_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        chosen = {"analysis_s": analysis_s, "plan_s": plan_s, "plan_cpu_s": plan_cpu_s, "resolved_tile": [tile, tile],
                  "tile_batch": 1}  # fmt: skip
        return chosen | {"plan_keep_graphs": spec.keep_graphs} | _tiles_info(ls.tile_plan(trunk, shape, tile), shape)
    plan = ls.stream_plan(
        trunk, shape, memory_budget=spec.memory_budget, grad=spec.grad, device=device,
        activation_dtype=_autocast_dtype(spec),
    )  # fmt: skip
    plan_s, plan_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {
        "analysis_s": analysis_s,
        "plan_s": plan_s,
        "plan_cpu_s": plan_cpu_s,
        "split": plan.split[1] if plan.split else None,
        "resolved_tile": list(plan.tile_size),
        "plan_keep_graphs": plan.keep_graphs,
        "tile_batch": plan.tile_batch,
        "trunk_calls": len(plan.runs),
        "predicted_mib": plan.predicted_bytes / MiB,
        "predicted_s": plan.predicted_seconds,
        "predicted_conventional_mib": plan.conventional_bytes / MiB,
        "predicted_conventional_s": plan.conventional_seconds,
        "plan": str(plan),
    } | _tiles_info(plan.tiles, shape)


def _autocast_dtype(spec: RunSpec) -> torch.dtype | None:
    return None if spec.dtype == "float32" else getattr(torch, spec.dtype)


def measure(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` in this process and return its measurements."""
    device = torch.device(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    trunk, head = build(spec.network, spec.seed, device)
    params = list(trunk.parameters()) + list(head.parameters())
    probe = MemoryProbe(device)
    autocast = _autocast_dtype(spec)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        shape = (1, 3, spec.height, spec.width)
        if spec.mode in ("budget", "per-tile"):
            chosen = budget_plan_info(spec, trunk, shape, device)
            tile = chosen["resolved_tile"][0]
        else:
            chosen, tile = plan_info(trunk, shape, spec.tile_size), spec.tile_size
        forward = make_step(spec, trunk, tile)
        # A tiny step initialises thread pools, kernels and (streamed) the trunk's graph analysis,
        # so the idle baseline is the ready-to-train process, before any image-sized allocation.
        tiny = torch.randn(1, 3, PRIMING_SIZE, PRIMING_SIZE, device=device)
        training_step(forward, head, params, tiny, probe, spec.grad)
        idle = probe.current_mib()
        generator = torch.Generator(device=device).manual_seed(spec.seed + 1)
        x = torch.randn(*shape, generator=generator, device=device)
        ready = probe.current_mib()
        result: dict[str, Any] = asdict(spec) | chosen
        if spec.full_warmup:
            training_step(forward, head, params, x, probe, spec.grad)
        forward_s, backward_s = training_step(forward, head, params, x, probe, spec.grad)
    load = os.getloadavg()[0]  # the machine is shared: how busy it was during the step
    out_pixels = math.prod(result["output_shape"])
    result |= {
        "forward_s": forward_s,
        "backward_s": backward_s,
        "step_s": forward_s + backward_s,
        "idle_mib": idle,
        "ready_mib": ready,
        "peak_mib": probe.peak_mib(),
        "memory_source": probe.source,
        "input_bytes": x.numel() * x.element_size(),
        "output_bytes": head.linear.in_features * out_pixels * x.element_size(),
        "load_1min": load,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return result


def child_main(spec_json: str) -> int:
    """Entry point of ``--child``: measure and print the result line."""
    result = measure(RunSpec.from_json(spec_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0
