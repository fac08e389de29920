"""What the children of ``vs_lightstream.py`` share: the run specification, the trunks of
the exactness cases, memory probes, the timed training step and the gradient comparison.

Pure PyTorch (no ``lightning_streaming``, no ``lightstream``), so that both our child
(``vs_lightstream.py --child``, our venv) and the peer's child
(``peers/lightstream_child.py``, the lightstream venv) import it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench_networks import NETWORKS, Head, output_channels, randomise_batch_norm, vgg_trunk

RESULT_PREFIX = "VS_LIGHTSTREAM_RESULT "
LIBRARIES = ("conventional", "ours", "lightstream")
PRIMING_SIZE = 64
MiB = 2**20
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RunSpec:
    """One child process: ``library`` runs ``network`` (a benchmark trunk or an exactness
    case) on a ``batch`` x 3 x ``height`` x ``width`` image with ``tile_size``."""

    library: str  # "conventional", "ours" or "lightstream"
    network: str  # a key of bench_networks.NETWORKS or of CASES
    height: int
    width: int
    tile_size: int
    dtype: str = "float32"
    batch: int = 1
    seed: int = 0
    threads: int | None = None
    input_grad: bool = False  # the timed step also computes the input gradient
    check_grads: bool = True  # after the timed step, compare with a conventional step in this process
    role: str = "main"  # "main", "input-grad" or "exactness"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------
# Trunks of the exactness table. Each is small enough for float64 on 2 CPU cores.


def _norm_trunk() -> nn.Sequential:
    """Convolutions with eval-mode BatchNorm whose affine weight and bias are trainable,
    with non-trivial running statistics."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    )  # fmt: skip
    randomise_batch_norm(trunk, shift=0.2)
    return trunk.eval()


def _dilated_trunk() -> nn.Sequential:
    """A dilated 3x3 convolution (dilation 2, padding 2) between ordinary ones."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    )  # fmt: skip


def _small_vgg_trunk() -> nn.Sequential:
    """The VGG-like trunk (four blocks, total stride 16) at an eighth of the widths."""
    return vgg_trunk(widths=(4, 8, 16, 32))


@dataclass(frozen=True)
class Case:
    """One row of the exactness table."""

    label: str
    build: Callable[[], nn.Sequential]
    height: int
    width: int
    tile_size: int
    batch: int
    what: str


CASES: dict[str, Case] = {
    "bias-batch2": Case("(a) conv biases, batch 2", NETWORKS["table1"], 512, 512, 256, 2,
                        "Table I network (conv biases), batch 2, 512², tile 256"),
    "norm-trainable": Case("(b) trainable norm parameters", _norm_trunk, 512, 512, 256, 1,
                           "conv + eval-mode BatchNorm with trainable weight/bias, 512², tile 256"),
    "dilated": Case("(c) dilated convolution", _dilated_trunk, 512, 512, 256, 1,
                    "3x3 convolution with dilation 2 between 3x3 convolutions, 512², tile 256"),
    "unaligned": Case("(d) size not aligned to the stride", _small_vgg_trunk, 512 + 13, 512 + 13, 256, 1,
                      "VGG-like trunk (stride 16, widths /8), 525² (512 + 13), tile 256"),
    "odd-tile": Case("(e) odd tile vs image", _small_vgg_trunk, 700, 700, 301, 1,
                     "VGG-like trunk (stride 16, widths /8), 700², tile 301"),
    "aligned-control": Case("control: aligned, batch 1", _small_vgg_trunk, 512, 512, 256, 1,
                            "VGG-like trunk (stride 16, widths /8), 512², tile 256"),
}  # fmt: skip


def build(spec: RunSpec) -> tuple[nn.Sequential, Head]:
    """The trunk and head of ``spec``, initialised from ``spec.seed``, in ``spec.dtype``:
    every library and the conventional reference get identical weights."""
    torch.manual_seed(spec.seed)
    trunk = CASES[spec.network].build() if spec.network in CASES else NETWORKS[spec.network]()
    head = Head(output_channels(trunk))
    dtype = DTYPES[spec.dtype]
    return trunk.to(dtype), head.to(dtype)


def make_input(spec: RunSpec) -> Tensor:
    generator = torch.Generator().manual_seed(spec.seed + 1)
    return torch.randn(spec.batch, 3, spec.height, spec.width, generator=generator, dtype=DTYPES[spec.dtype])


# ---------------------------------------------------------------------------------------
# Memory: the resident set's high-water mark, resettable per phase (Linux).


class Memory:
    """Peak resident memory per phase. ``reset()`` writes 5 to ``/proc/self/clear_refs``,
    which resets the kernel's high-water mark (VmHWM, also what ``ru_maxrss`` reports), so
    the preparation and the step get their own peaks; the process's overall peak is the
    maximum over the phases."""

    def __init__(self) -> None:
        self.process_peak = self.peak_mib()
        self.resettable = self._try_reset()

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            return None
        return None

    def _try_reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def peak_mib(self) -> float:
        value = self._status("VmHWM")
        return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def current_mib(self) -> float:
        value = self._status("VmRSS")
        return value if value is not None else self.peak_mib()

    def reset(self) -> None:
        """Start a new phase (its peak starts at the current RSS)."""
        self.process_peak = max(self.process_peak, self.peak_mib())
        self._try_reset()

    def phase_peak(self) -> float:
        peak = self.peak_mib()
        self.process_peak = max(self.process_peak, peak)
        return peak


# ---------------------------------------------------------------------------------------
# The step and the gradient comparison.


def prime(spec: RunSpec) -> None:
    """A tiny conventional step of a throwaway copy of the network, so that thread pools and
    kernels are initialised before any measurement, identically for every library."""
    trunk, head = build(spec)
    x = torch.randn(1, 3, PRIMING_SIZE, PRIMING_SIZE, dtype=DTYPES[spec.dtype])
    head(trunk(x)).backward()


def categories(trunk: nn.Module) -> dict[str, str]:
    """Parameter name -> "weight" (convolution weight), "bias" (convolution bias) or
    "norm" (a normalisation layer's affine parameters)."""
    found: dict[str, str] = {}
    for module_name, module in trunk.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.conv._ConvNd):
                found[prefix + name] = "weight" if name == "weight" else "bias"
            else:
                found[prefix + name] = "norm"
    return found


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def conventional_reference(spec: RunSpec, x: Tensor, input_grad: bool) -> dict[str, Any]:
    """A conventional step of a freshly built copy of the network on ``x``: its output, its
    trunk's and head's parameter gradients, and the input gradient when asked."""
    trunk, head = build(spec)
    x = x.detach().clone().requires_grad_(input_grad)
    out = trunk(x)
    head(out).backward()
    return {
        "output": out.detach(),
        "trunk": grads_of(trunk),
        "head": grads_of(head),
        "input": x.grad if input_grad else None,
        "categories": categories(trunk),
        "requires_grad": {n: p.requires_grad for n, p in trunk.named_parameters()},
    }


def _max_diff(pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """max |a - b| and max |b| (the reference's scale) over the pairs."""
    diff = max(((a.double() - b.double()).abs().max().item() for a, b in pairs), default=0.0)
    scale = max((b.double().abs().max().item() for _, b in pairs), default=0.0)
    return diff, scale


def compare(
    reference: dict[str, Any],
    output: Tensor | None,
    trunk_grads: dict[str, Tensor],
    head_grads: dict[str, Tensor],
    input_grad: Tensor | None,
) -> dict[str, Any]:
    """Max |difference| from the conventional step, per kind of gradient, with the
    reference's largest |value| for scale. A trainable parameter that got no gradient is
    reported under ``missing``."""
    result: dict[str, Any] = {}
    by_kind: dict[str, list[tuple[Tensor, Tensor]]] = {}
    missing = []
    for name, ref in reference["trunk"].items():
        got = trunk_grads.get(name)
        if got is None:
            missing.append(name)
            got = torch.zeros_like(ref)
        by_kind.setdefault(reference["categories"][name], []).append((got, ref))
    for kind, pairs in by_kind.items():
        result[f"grad_{kind}_maxdiff"], result[f"grad_{kind}_scale"] = _max_diff(pairs)
    pairs = [(head_grads[n], ref) for n, ref in reference["head"].items() if n in head_grads]
    result["grad_head_maxdiff"], result["grad_head_scale"] = _max_diff(pairs)
    if output is not None:
        if tuple(output.shape) == tuple(reference["output"].shape):
            result["output_maxdiff"], result["output_scale"] = _max_diff([(output, reference["output"])])
        else:
            result["output_shape_mismatch"] = f"{tuple(output.shape)} vs {tuple(reference['output'].shape)}"
    if reference["input"] is not None:
        if input_grad is None:
            result["input_grad_error"] = "no input gradient"
        elif tuple(input_grad.shape) != tuple(reference["input"].shape):
            result["input_grad_error"] = f"shape {tuple(input_grad.shape)} vs {tuple(reference['input'].shape)}"
        else:
            result["grad_input_maxdiff"], result["grad_input_scale"] = _max_diff([(input_grad, reference["input"])])
    if missing:
        result["missing_grads"] = missing
    return result


@dataclass
class StepTimes:
    forward_s: float
    backward_s: float

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def measurement(spec: RunSpec, memory: Memory, prepare: Callable[[], Any], step: Callable[[Any, Tensor], Any],
                collect: Callable[[Any, Tensor], dict[str, Any]], image_requires_grad: bool | None = None,
                ) -> dict[str, Any]:  # fmt: skip
    """The common skeleton of a child: prime, prepare (timed, with its own memory peak),
    create the image, run the timed step (its own memory peak), then, if asked, compare
    with a conventional step computed in this process.

    The image requires grad when ``spec.input_grad``, unless ``image_requires_grad`` says
    otherwise (lightstream computes its input gradient, the "saliency map", itself from an
    image that must not require grad).

    ``prepare()`` returns the library's state; ``step(state, x)`` runs one training step and
    returns ``(StepTimes, output)``; ``collect(state, x)`` returns the trunk's parameter
    gradients, the head's and the input's, after the step."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    prime(spec)
    memory.reset()
    before_prepare = memory.current_mib()
    state, prepare_s = timed(prepare)
    prepare_peak = memory.phase_peak()
    idle = memory.current_mib()
    memory.reset()
    x = make_input(spec)
    if spec.input_grad if image_requires_grad is None else image_requires_grad:
        x.requires_grad_(True)
    times, output = step(state, x)
    step_peak = memory.phase_peak()
    load = os.getloadavg()[0]
    result: dict[str, Any] = asdict(spec) | {
        "prepare_s": prepare_s,
        "forward_s": times.forward_s,
        "backward_s": times.backward_s,
        "step_s": times.step_s,
        "before_prepare_mib": before_prepare,
        "prepare_peak_mib": prepare_peak,
        "idle_mib": idle,
        "peak_mib": step_peak,
        "process_peak_mib": memory.process_peak,
        "memory_resettable": memory.resettable,
        "input_mib": x.numel() * x.element_size() / MiB,
        "load_1min": load,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "output_shape": list(output.shape) if output is not None else None,
    }
    if spec.check_grads:
        grads = collect(state, x)
        reference = conventional_reference(spec, x, spec.input_grad)
        result |= compare(reference, output, grads["trunk"], grads["head"], grads.get("input"))
        result["load_1min_end"] = os.getloadavg()[0]
    return result


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def region_pixels_ratio(regions: list[tuple[int, int]], height: int, width: int) -> float:
    """Pixels the tiles' input regions cover over the image's pixels (1 = no overlap)."""
    return sum(math.prod(r) for r in regions) / (height * width)
