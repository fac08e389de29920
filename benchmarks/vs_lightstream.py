"""Side by side with lightstream 1.0.7: the same trunks, images, tile_size, dtype and weights.

For the Table I network, the VGG-like trunk and a ResNet-18 trunk (conv1 .. layer4, the
whole convolutional body, eval-mode BatchNorm with frozen parameters in both libraries), one
training step (trunk, then global mean pool + linear, forward and backward; batch 1;
float32; the image not requiring grad) run three ways, each run a fresh process:

- ``conventional``: the plain trunk (this venv);
- ``ours``: ``lightning_streaming.stream(trunk, x, tile_size)`` (default keep_graphs=1);
- ``lightstream``: ``lightstream.modules.streaming.StreamingModule(trunk, tile_size)`` in its
  own venv (``benchmarks/peers/setup_lightstream.sh``), driven by
  ``benchmarks/peers/lightstream_child.py``.

Per run: the tiling preparation time (ours: tracing the trunk and planning the tiles,
``ls.tile_plan``; lightstream: its constructor, which computes the tile statistics by
running the trunk forward and backward on an all-ones tile), the step's forward and
backward time, and the resident memory: the idle process before the image exists, the
step's peak and the preparation's peak (each phase its own high-water mark, reset through
/proc/self/clear_refs), and the process's peak over all phases. After the timed step (on
the first repeat) the same process computes a conventional step of a freshly built copy of
the network on the same image and reports max |difference| of the output and of each kind
of gradient. A separate run per library, with the image requiring grad, measures the
input gradient (lightstream's ``saliency=True``).

The three runs of a configuration alternate, in a rotated order, ``--repeats`` times;
tables show medians and medians of the ratios of neighbouring runs.

The exactness table runs small float64 cases: (a) conv biases with batch 2, (b) trainable
BatchNorm affine parameters, (c) a dilated convolution, (d) an image not aligned to the
trunk's stride, (e) an odd tile size, and an aligned control.

    bash benchmarks/peers/setup_lightstream.sh                          # once: the peer venv
    python benchmarks/vs_lightstream.py --quick                         # smoke run, a few minutes
    nice -n 5 python benchmarks/vs_lightstream.py                       # full run (about 30 min on 2 cores)
    python benchmarks/vs_lightstream.py --replot                        # tables and plot from the saved JSON

Writes ``<out-dir>/vs_lightstream.md``, ``vs_lightstream.json`` and ``vs_lightstream.png``
(default out-dir ``results/vs_lightstream``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import vs_common as common
from child_process import run_measurement
import vs_report as report
from vs_common import CASES, RunSpec

log = logging.getLogger("vs_lightstream")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PEER_PYTHON = ROOT / "results" / "peers" / "venv-lightstream" / "bin" / "python"
PEER_CHILD = HERE / "peers" / "lightstream_child.py"
PATCHES = [
    "lightstream/core/scnn/scnn.py, StreamingCNN._configure: after computing the tile statistics on the CPU "
    "(statistics_on_cpu=True, the default of StreamingConstructor) it calls `self.stream_module.cuda()` and sets "
    '`self.device = torch.device("cuda")` unconditionally; patched to use CUDA only when '
    "`torch.cuda.is_available()`, else stay on the CPU (benchmarks/peers/patch_lightstream_cpu.py, applied by "
    "setup_lightstream.sh). Nothing else is changed; lightstream's backward still enters "
    '`torch.autocast(device_type="cuda", dtype=...)`, which on a CPU-only build only warns and is disabled.',
]


@dataclass(frozen=True)
class Group:
    name: str
    specs: tuple[RunSpec, ...]
    repeat: int = 0  # which repeat of the main comparison (ratios pair within a repeat)


# ---------------------------------------------------------------------------------------
# Our child: conventional or ours, in this venv.


def our_child(spec: RunSpec) -> dict[str, Any]:
    import lightning_streaming as ls

    memory = common.Memory()
    trunk, head = common.build(spec)
    shape = (spec.batch, 3, spec.height, spec.width)
    plan_holder: dict[str, Any] = {}

    def prepare() -> Any:
        if spec.library == "ours":
            plan_holder["plan"] = ls.tile_plan(trunk, shape, spec.tile_size)  # traces the trunk, plans the tiles
        return None

    def step(_: Any, x: torch.Tensor) -> tuple[common.StepTimes, torch.Tensor]:
        if spec.library == "ours":
            out, forward_s = common.timed(lambda: ls.stream(trunk, x, spec.tile_size))
        else:
            out, forward_s = common.timed(lambda: trunk(x))
        _, backward_s = common.timed(lambda: head(out).backward())
        return common.StepTimes(forward_s, backward_s), out.detach()

    def collect(_: Any, x: torch.Tensor) -> dict[str, Any]:
        return {"trunk": common.grads_of(trunk), "head": common.grads_of(head), "input": x.grad}

    try:
        result = common.measurement(spec, memory, prepare, step, collect)
    except Exception as error:  # a refusal is a result of the comparison
        return asdict(spec) | {"error": f"{type(error).__name__}: {error}"}
    if "plan" in plan_holder:
        plan = plan_holder["plan"]
        regions = [tuple(s.size for s in tile) for tile in plan]
        result |= {
            "grid": list(plan.grid),
            "n_tiles": len(plan),
            "backward_tiles": len(plan),
            "halo_factor": common.region_pixels_ratio(regions, spec.height, spec.width),
            "largest_region": list(plan.largest_region),
        }
    return result


# ---------------------------------------------------------------------------------------
# The parent.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["table1", "vgg", "resnet18"], choices=["table1", "vgg", "resnet18"])
    parser.add_argument("--size", type=int, default=2048, help="image side for Table I and VGG (default 2048)")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile_size for Table I and VGG (default 1024)")
    parser.add_argument("--resnet-size", type=int, default=2048, help="image side for ResNet-18 (default 2048)")
    parser.add_argument("--resnet-tile-size", type=int, default=1280, help="tile_size for ResNet-18 (default 1280)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--libraries", nargs="+", default=["conventional", "ours", "lightstream"], choices=common.LIBRARIES)
    parser.add_argument("--check-all-repeats", action="store_true", help="compare gradients in every repeat, not only the first")
    parser.add_argument("--input-grad-runs", action=argparse.BooleanOptionalAction, default=True,
                        help="one extra run per network and streaming library with the image requiring grad")  # fmt: skip
    parser.add_argument("--main", action=argparse.BooleanOptionalAction, default=True, help="the timing/memory comparison")
    parser.add_argument("--exactness", action=argparse.BooleanOptionalAction, default=True, help="the exactness table")
    parser.add_argument("--exactness-dtype", default="float64", choices=sorted(common.DTYPES))
    parser.add_argument("--tolerance", type=float, default=None,
                        help="relative tolerance of the exactness verdicts (default 1e-9 for float64, 1e-3 for float32)")  # fmt: skip
    parser.add_argument("--peer-python", type=Path, default=Path(os.environ.get("LIGHTSTREAM_PYTHON", DEFAULT_PEER_PYTHON)))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("results/vs_lightstream"))
    parser.add_argument("--child-timeout", type=float, default=1800.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512² (tile 256), ResNet 768² (tile 640), 1 repeat")
    parser.add_argument("--replot", action="store_true", help="only redo the tables and plot from <out-dir>/vs_lightstream.json")
    parser.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.size, args.tile_size, args.resnet_size, args.resnet_tile_size, args.repeats = 512, 256, 768, 640, 1
    if args.tolerance is None:
        args.tolerance = 1e-9 if args.exactness_dtype == "float64" else 1e-3
    return args


def config_of(args: argparse.Namespace, network: str) -> tuple[int, int]:
    return (args.resnet_size, args.resnet_tile_size) if network == "resnet18" else (args.size, args.tile_size)


def plan_groups(args: argparse.Namespace) -> list[Group]:
    groups: list[Group] = []
    if args.main:
        for network in args.networks:
            size, tile = config_of(args, network)
            for repeat in range(args.repeats):
                specs = tuple(
                    RunSpec(library, network, size, size, tile, seed=args.seed, threads=args.threads,
                            check_grads=library != "conventional" and (repeat == 0 or args.check_all_repeats))
                    for library in args.libraries
                )  # fmt: skip
                shift = repeat % len(specs)
                groups.append(Group(f"main-{network}-{size}-r{repeat}", specs[shift:] + specs[:shift], repeat))
        if args.input_grad_runs:
            for network in args.networks:
                size, tile = config_of(args, network)
                specs = tuple(
                    RunSpec(library, network, size, size, tile, seed=args.seed, threads=args.threads, input_grad=True, role="input-grad")
                    for library in args.libraries if library != "conventional"
                )  # fmt: skip
                groups.append(Group(f"input-grad-{network}", specs))
    if args.exactness:
        for name, case in CASES.items():
            specs = tuple(
                RunSpec(library, name, case.height, case.width, case.tile_size, dtype=args.exactness_dtype,
                        batch=case.batch, seed=args.seed, threads=args.threads, input_grad=input_grad, role="exactness")
                for library in args.libraries if library != "conventional"
                for input_grad in (False, True)
            )  # fmt: skip
            groups.append(Group(f"exactness-{name}", specs))
    return groups


def command_for(run: RunSpec, args: argparse.Namespace) -> list[str]:
    if run.library == "lightstream":
        return [str(args.peer_python), str(PEER_CHILD), run.to_json()]
    return [sys.executable, str(Path(__file__).resolve()), "--child", run.to_json()]


def run_child(run: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``run`` in a fresh interpreter; on failure, a result with ``error``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return run_measurement(command_for(run, args), common.RESULT_PREFIX, asdict(run), args.child_timeout, env)


def run_groups(groups: list[Group], args: argparse.Namespace) -> list[dict[str, Any]]:
    total = sum(len(g.specs) for g in groups)
    results: list[dict[str, Any]] = []
    for group in groups:
        for run in group.specs:
            started = time.perf_counter()
            result = run_child(run, args) | {"group": group.name, "repeat": group.repeat}
            results.append(result)
            log_progress(len(results), total, run, result, time.perf_counter() - started)
    return results


def log_progress(done: int, total: int, run: RunSpec, result: dict[str, Any], wall: float) -> None:
    label = f"{run.role} {run.network} {run.height}² tile {run.tile_size} {run.library} {run.dtype}" + (" +input grad" if run.input_grad else "")
    if "error" in result:
        log.warning("[%d/%d] %s: ERROR %s", done, total, label, result["error"][:300])
        return
    log.info(
        "[%d/%d] %s: prepare %.3f s, step %.2f s (fwd %.2f, bwd %.2f), peak %.0f MiB (idle %.0f), load %.1f, %.0f s wall",
        done, total, label, result["prepare_s"], result["step_s"], result["forward_s"], result["backward_s"],
        result["peak_mib"], result["idle_mib"], result["load_1min"], wall,
    )  # fmt: skip


def machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    peer = ""
    try:
        peer = subprocess.run(
            [str(args.peer_python), "-c", "import importlib.metadata as m, torch; print(f\"lightstream {m.version('lightstream')}, torch {torch.__version__}, lightning {m.version('lightning')}\")"],
            capture_output=True, text=True, timeout=120,
        ).stdout.strip()  # fmt: skip
    except OSError as error:
        peer = f"peer venv not usable: {error}"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peer": peer,
        "loadavg_start": os.getloadavg(),
    }


def render(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    rows = report.aggregate(results, "main")
    failures = [r for r in results if r.get("role") == "main" and "error" in r]
    load = lambda key: ", ".join(f"{v:.2f}" for v in info.get(key, ()))  # noqa: E731
    parts = [
        "# lightning_streaming vs lightstream 1.0.7",
        f"Machine: {info['nproc']} CPU cores ({info['cpu']}), {info['platform']}, Python {info['python']}; ours: torch "
        f"{info['torch']}; peer venv: {info['peer']}. Load averages (1, 5, 15 min) at the start: {load('loadavg_start')}; "
        f"at the end: {load('loadavg_end')}. The machine was shared with other CPU jobs: *load* per row is the "
        "1-minute load average right after the step (2 cores: above ~2 other processes competed for them).",
        "Patches lightstream needed on a CPU:\n\n" + "\n".join(f"- {p}" for p in PATCHES),
    ]
    if args.main:
        parts += [
            "## Time and memory of one training step",
            "Batch 1, float32, the image not requiring grad; head: global mean pool + linear; same weights (seeded "
            "construction) and image in every run. *tile* is each library's `tile_size` argument, the same number "
            "for both, but not the same thing: for ours it is the largest input region of a tile, halo included, "
            "with the output split into a balanced grid; for lightstream every tile is a tile_size² crop, the tiles "
            "step by the tile's valid output, and the last row/column is shifted back to end at the border. "
            "*tiles (fwd / bwd)*: tiles in the forward and in the backward; *overlap*: pixels of all forward tiles "
            "÷ image pixels. *prepare*: ours = `ls.tile_plan` (trace + plan); lightstream = `StreamingModule(...)` "
            "(tile statistics from a forward and backward of an all-ones tile). Memory is resident memory (RSS, "
            "MiB): *baseline* = process with torch imported, the network built and the runtime primed by a tiny "
            "conventional step, before the library prepares anything; *idle* = the same after the library's "
            "preparation, before the image exists; *step peak* = high-water mark during the step (reset before "
            "the image is created); *step peak − baseline* = what the library and the step cost (the memory "
            "target compares this); *prepare peak* and *process peak* (all phases). Times and memory are medians; ratios are medians of ratios of "
            "neighbouring runs.",
            report.time_memory_table(rows, failures),
            "## Gradient differences from the conventional step (float32)",
            "max |grad − conventional grad| over all parameters of a kind (the conventional gradient's max |value| "
            "in parentheses), computed in the same process right after the timed step, on a freshly built copy with "
            "the same weights and image. *input*: a separate run with the image requiring grad (lightstream: "
            "`saliency=True`). In float32 differences of about 1e-7 × the scale × √(pixels summed) are summation "
            "order; the float64 table below shows what is exact.",
            report.grad_table(results),
        ]
        networks = sorted({k[0] for k in rows})
        verdicts = []
        for network in networks:
            size, tile = config_of(args, network)
            verdicts += [report.speed_verdict(rows, network, size, tile), report.memory_verdict(rows, network, size, tile)]
        parts += ["## Targets", "\n".join(v.line() for v in verdicts)]
    if args.exactness:
        parts += [
            f"## Exactness ({args.exactness_dtype})",
            f"max |grad − conventional grad| in {args.exactness_dtype} (reference scale in parentheses), parameters "
            "and input gradient from separate runs. Verdict *exact*: every kind within a relative "
            f"{args.tolerance:g} of its scale; *error*: the library raised, with its message.",
            report.exactness_table(results, CASES, args.tolerance),
        ]
    parts.append(f"Command: `python benchmarks/vs_lightstream.py {' '.join(args.argv)}`")
    return "\n\n".join(parts) + "\n"


def write_outputs(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render(results, info, args)
    (args.out_dir / "vs_lightstream.md").write_text(markdown)
    rows = report.aggregate(results, "main")
    if rows:
        report.plot(rows, args.out_dir / "vs_lightstream.png")
    print(markdown)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        common.emit(our_child(RunSpec.from_json(args.child)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    raw = args.out_dir / "vs_lightstream.json"
    if args.replot:
        saved = json.loads(raw.read_text())
        args = parse_args([*saved["args"], "--out-dir", str(args.out_dir)])
        args.argv = saved["args"]  # the command that measured
        write_outputs(saved["results"], saved["machine"], args)
        return 0
    if "lightstream" in args.libraries and not args.peer_python.exists():
        log.error("no peer venv at %s: run `bash benchmarks/peers/setup_lightstream.sh` (or pass --peer-python)", args.peer_python)
        return 2
    info = machine(args)
    groups = plan_groups(args)
    log.info("%d runs; machine load %s", sum(len(g.specs) for g in groups), info["loadavg_start"])
    results = run_groups(groups, args)
    info["loadavg_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"args": args.argv, "machine": info, "results": results}, indent=1))
    write_outputs(results, info, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
