"""Check a trunk in one call: streamed against conventional, outputs and every gradient."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import StreamingMismatchError
from .plan import TilePlan
from .stream import stream, stream_plan


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of ``expected``."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class VerificationReport:
    """Differences between streamed and conventional results (relative to the largest
    conventional magnitude of each tensor)."""

    plan: TilePlan
    tolerance: float
    output: float
    input_grad: float
    parameter_grads: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max([self.output, self.input_grad, *self.parameter_grads.values()])

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance

    def __str__(self) -> str:
        lines = [
            f"{self.plan}",
            f"{'tensor':<40} {'relative error':>15}",
            f"{'output':<40} {self.output:>15.3e}",
            f"{'input gradient':<40} {self.input_grad:>15.3e}",
        ]
        lines += [f"{'grad ' + name:<40} {error:>15.3e}" for name, error in self.parameter_grads.items()]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict}: worst {self.worst:.3e}, tolerance {self.tolerance:.1e}")
        return "\n".join(lines)


def verify(
    module: nn.Module,
    input: Tensor | Sequence[int],
    tile_size: int | Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    tolerance: float | None = None,
    seed: int = 0,
    raise_on_mismatch: bool = True,
    **stream_kwargs,
) -> VerificationReport:
    """Run ``module`` streamed and conventionally on the same input and compare outputs,
    parameter gradients and input gradients (every output, for a trunk that returns a
    tuple, list or dict of feature maps).

    The module is copied and cast to ``dtype`` (float64 by default, so differences are
    rounding, not precision); the original is untouched. ``input`` is a tensor or a shape
    ``(N, C, *spatial)`` for a random one; the output gradients are random.

    Raises :class:`StreamingMismatchError` when any relative error exceeds ``tolerance``
    (default 1e-9 in float64, 1e-3 otherwise) and ``raise_on_mismatch`` is true.

    Example::

        report = lightning_streaming.verify(trunk, (2, 3, 517, 389), tile_size=160)
        print(report)
    """
    generator = torch.Generator().manual_seed(seed)
    trunk = copy.deepcopy(module).to(dtype)
    device = next((p.device for p in trunk.parameters()), torch.device("cpu"))
    if isinstance(input, Tensor):
        x = input.detach().to(device=device, dtype=dtype).clone()
    else:
        x = torch.randn(tuple(input), generator=generator, dtype=dtype).to(device)
    x.requires_grad_(True)
    names = [name for name, p in trunk.named_parameters() if p.requires_grad]
    params = [p for p in trunk.parameters() if p.requires_grad]

    expected = pytree.tree_leaves(trunk(x))
    grad_outputs = [torch.randn(e.shape, generator=generator, dtype=dtype).to(device) for e in expected]
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_outputs, allow_unused=True)

    actual = pytree.tree_leaves(stream(trunk, x, tile_size, **stream_kwargs))
    actual_grads = torch.autograd.grad(actual, [x, *params], grad_outputs, allow_unused=True)

    def error(a: Tensor | None, e: Tensor | None) -> float:
        if a is None or e is None:
            return 0.0 if (a is None or not a.any()) and (e is None or not e.any()) else float("inf")
        return relative_error(a, e)

    planning = {k: v for k, v in stream_kwargs.items() if k in ("keep_graphs", "memory_budget", "tile_batch")}
    plan = stream_plan(trunk, x.shape, tile_size, input_grad=True, input_dtype=dtype, device=device, **planning)
    report = VerificationReport(
        plan=plan.tiles,
        tolerance=tolerance if tolerance is not None else (1e-9 if dtype == torch.float64 else 1e-3),
        output=max(
            error(a, e) if a.shape == e.shape else float("inf") for a, e in zip(actual, expected)
        ) if len(actual) == len(expected) else float("inf"),
        input_grad=error(actual_grads[0], expected_grads[0]),
        parameter_grads={n: error(a, e) for n, a, e in zip(names, actual_grads[1:], expected_grads[1:])},
    )
    if raise_on_mismatch and not report.passed:
        raise StreamingMismatchError(f"streamed and conventional results differ:\n{report}")
    return report
