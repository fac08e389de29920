"""The experiment's markdown table, per-step CSV and figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .experiment import Comparison
from .textures import CELL_SIDE, SKIMAGE_REQUIREMENT, TEXTURES

__all__ = ["closing_note", "markdown", "write_csv", "plot", "write_report"]


def _regions(counts: dict[tuple[int, int], int], steps: int) -> str:
    sizes = ", ".join(f"{n / steps:g} x {h}x{w}" for (h, w), n in sorted(counts.items(), reverse=True))
    return f"{sum(counts.values()) / steps:g} per step ({sizes})"


def closing_note(comparison: Comparison) -> str:
    """Whether the two loss curves agree to float rounding for the whole run, with the numbers."""
    settings = comparison.settings
    worst = float(comparison.step_differences.max())
    losses = comparison.conventional.step_losses
    relative = float((comparison.step_differences / np.abs(losses)).max())
    eps = torch.finfo(getattr(torch, settings.dtype)).eps
    steps = len(losses)
    text = (
        f"Over all {steps} steps the largest |difference| between the streamed and the conventional training loss "
        f"is {worst:.3g} ({relative:.3g} of the loss, {relative / eps:.3g} {settings.dtype} epsilons); "
        f"{int((comparison.step_differences == 0).sum())} steps agree exactly."
    )
    rounding = comparison.rounding_differences
    if rounding is not None:
        # Both float32 runs carry their own rounding error, so their difference is expected at
        # about sqrt(2) times the error of one (float32 vs float64): allow twice that.
        met = worst <= 2 * rounding.max()
        text += (
            f" Float32 rounding itself moves the conventional curve by up to {rounding.max():.3g} (conventional "
            f"float32 vs float64 from the same start, same batches). Target \"the two loss curves agree to float "
            f"rounding for the whole run\": {'met' if met else 'NOT met'}: the streaming difference is "
            f"{worst / rounding.max():.2g}x float32's own rounding difference (criterion: at most 2x, as two float32 "
            "runs each carry their own rounding error, so their difference is expected near 1.4x one run's)."
        )
    elif settings.dtype == "float64":
        met = relative < 1e-10
        text += (
            f" Target \"the two loss curves agree to float rounding for the whole run\": {'met' if met else 'NOT met'}"
            f" (criterion: relative difference below 1e-10, about a thousandth of one float32 rounding step)."
        )
    worst_param, scale = comparison.parameter_difference()
    return text + f" Final parameters differ by at most {worst_param:.3g} (largest |parameter| {scale:.3g})."


def markdown(comparison: Comparison, command: str) -> str:
    """The report: command, set-up, per-epoch table and closing note."""
    s, conv, streamed = comparison.settings, comparison.conventional, comparison.streamed
    steps = len(conv.step_losses)
    plan = comparison.plan
    regions = " x ".join(
        "/".join(str(segment.size) for segment in segments) for segments in plan.segments
    )  # per dimension, the sizes of the tiles' input regions
    reference = comparison.reference is not None
    lines = [
        "# Streamed and conventional training from one initialisation (paper section V, in small)",
        "",
        f"Command: `{command}`",
        "",
        f"- Data: {len(TEXTURES)} texture classes from {SKIMAGE_REQUIREMENT}'s sample images "
        f"({', '.join(f'{k} = {Path(m).name}' for k, (m, _) in TEXTURES.items())}), greyscale, "
        f"{s.train_per_class} training and {s.tune_per_class} tuning cells of {CELL_SIDE}x{CELL_SIDE} px per "
        f"class. Training: random-resized crops (8%-100% of the area, aspect 3/4-4/3) resized to "
        f"{s.size}x{s.size}, new every epoch; tuning: whole cells resized to {s.size}x{s.size}.",
        "- Network: Table II (7x7 conv stride 2 to 16, max-pool 2, 3x3 conv to 32, max-pool 2 | 3x3 convs to 64, "
        "128, 256 with max-pools, global max-pool, linear), ReLU, 'same' padding. Trunk: the first two blocks.",
        f"- Streaming: tile {comparison.tile} px (halo included): grid {plan.grid[0]} x {plan.grid[1]} "
        f"({len(plan)} tiles, input regions {regions} px) over the {s.size}x{s.size} input; trunk output "
        f"{tuple(plan.output_shape)}. In training the first convolution ran on "
        f"{_regions(streamed.trunk_regions, steps)} streamed, and on {_regions(conv.trunk_regions, steps)} "
        "conventionally.",
        f"- Training: SGD, lr {s.lr:g}, momentum {s.momentum:g}, batch {s.batch_size}, {s.epochs} epochs of "
        f"{steps // s.epochs} steps, {s.dtype}, seed {s.seed}, {s.threads} thread(s), torch {torch.__version__}. "
        f"Wall time: conventional {conv.seconds:.1f} s, streamed {streamed.seconds:.1f} s"
        + (f", float64 reference {comparison.reference.seconds:.1f} s." if reference else "."),
        "",
        "| epoch | steps | mean loss, conventional | mean loss, streamed | max \\|Δ\\| step loss "
        "| max \\|Δ\\| / loss | tuning loss, conventional | tuning loss, streamed | tuning accuracy c / s |"
        + (" max \\|f32 − f64\\| conventional |" if reference else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if reference else ""),
    ]
    for row in comparison.epoch_rows():
        lines.append(
            f"| {row['epoch']} | {row['steps']} | {row['loss_conventional']:.6f} | {row['loss_streamed']:.6f} "
            f"| {row['max_difference']:.3g} | {row['max_relative']:.3g} | {row['tuning_conventional']:.6f} "
            f"| {row['tuning_streamed']:.6f} | {row['tuning_accuracy_conventional']:.2f} / "
            f"{row['tuning_accuracy_streamed']:.2f} |" + (f" {row['max_rounding']:.3g} |" if reference else "")
        )
    lines += ["", closing_note(comparison), ""]
    return "\n".join(lines)


def write_csv(comparison: Comparison, path: Path) -> None:
    """Every step: epoch and the loss of each run."""
    columns = [comparison.conventional.step_losses, comparison.streamed.step_losses]
    header = "step,epoch,loss_conventional,loss_streamed"
    if comparison.reference is not None:
        columns.append(comparison.reference.step_losses)
        header += ",loss_conventional_float64"
    table = np.column_stack([np.arange(1, len(columns[0]) + 1), comparison.conventional.step_epochs + 1, *columns])
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt=["%d", "%d"] + ["%.17g"] * len(columns))


def plot(comparison: Comparison, path: Path) -> None:
    """Both loss curves on one panel (streamed dashed over conventional), |difference| per
    step on a log axis below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = comparison.settings
    steps = np.arange(1, len(comparison.conventional.step_losses) + 1)
    epoch_ends = [int(np.nonzero(comparison.conventional.step_epochs == e)[0][-1]) + 1 for e in range(s.epochs)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(steps, comparison.conventional.step_losses, color="tab:blue", lw=1.6, label="conventional, training")
    top.plot(steps, comparison.streamed.step_losses, color="tab:orange", lw=1.2, ls="--", label="streamed, training")
    top.plot(epoch_ends, comparison.conventional.tuning_losses, "o", color="tab:blue", ms=6, mfc="none",
             label="conventional, tuning")  # fmt: skip
    top.plot(epoch_ends, comparison.streamed.tuning_losses, "x", color="tab:orange", ms=5, label="streamed, tuning")
    top.set_ylabel("cross-entropy loss")
    top.set_title(
        f"Table II network, {s.size}x{s.size} texture crops, {s.dtype}: trunk streamed in "
        f"{comparison.plan.grid[0]}x{comparison.plan.grid[1]} tiles vs conventional",
        fontsize=10,
    )
    top.legend(fontsize=8)
    difference = comparison.step_differences
    exact = difference == 0
    bottom.semilogy(steps[~exact], difference[~exact], ".", color="tab:red", ms=3,
                    label=f"|streamed − conventional| ({int(exact.sum())} steps exactly 0, not shown)")  # fmt: skip
    rounding = comparison.rounding_differences
    if rounding is not None:
        bottom.semilogy(steps[rounding > 0], rounding[rounding > 0], ".", color="0.6", ms=2,
                        label="|conventional float32 − float64|: float32 rounding")  # fmt: skip
    eps = torch.finfo(getattr(torch, s.dtype)).eps
    bottom.axhline(eps * float(np.median(comparison.conventional.step_losses)), color="k", lw=0.8, ls=":",
                   label=f"{s.dtype} epsilon x median loss")  # fmt: skip
    bottom.set_xlabel("training step")
    bottom.set_ylabel("|difference| of step loss")
    bottom.legend(fontsize=8, loc="upper left")
    finite = difference[~exact]
    if finite.size == 0 and (rounding is None or not (rounding > 0).any()):
        bottom.set_ylim(eps / 10, 1)  # nothing to show on a log axis but the epsilon line
    for end in epoch_ends[:-1]:
        for axis in (top, bottom):
            axis.axvline(end + 0.5, color="0.9", lw=0.6, zorder=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(comparison: Comparison, folder: Path, command: str) -> dict[str, Path]:
    """Write ``equivalence_<dtype>.md``, ``steps_<dtype>.csv`` and ``equivalence_<dtype>.png``
    into ``folder`` (per dtype, so a float32 and a float64 run can sit side by side)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = comparison.settings.dtype
    paths = {
        "markdown": folder / f"equivalence_{dtype}.md",
        "csv": folder / f"steps_{dtype}.csv",
        "plot": folder / f"equivalence_{dtype}.png",
    }
    paths["markdown"].write_text(markdown(comparison, command))
    write_csv(comparison, paths["csv"])
    plot(comparison, paths["plot"])
    return paths
