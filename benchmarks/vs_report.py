"""Aggregation, markdown tables, verdicts and the bar plot of ``vs_lightstream.py``."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench_networks import NETWORK_LABELS
from bench_report import Verdict

Result = dict[str, Any]
Key = tuple[str, int, int, str]  # network, size, tile, library
TARGET_SPEEDUP = 2.0  # lightstream step / our step, same tile_size
LIBRARY_ORDER = {"conventional": 0, "ours": 1, "lightstream": 2}
GRAD_KINDS = ("weight", "bias", "norm", "head", "input")


def key_of(result: Result) -> Key:
    return (result["network"], result["height"], result["tile_size"], result["library"])


def ok(results: Iterable[Result], role: str | None = None) -> list[Result]:
    return [r for r in results if "error" not in r and (role is None or r.get("role") == role)]


@dataclass
class Row:
    """The runs of one (network, size, tile, library), with ratios to the runs of the same
    group and repeat (which ran next to each other)."""

    key: Key
    runs: list[Result]
    vs_conventional: list[float] = field(default_factory=list)  # step time / conventional's
    vs_ours: list[float] = field(default_factory=list)  # step time / ours (lightstream rows)
    memory_vs_ours: list[float] = field(default_factory=list)  # (peak - idle) / ours

    def median(self, name: str) -> float:
        return statistics.median(r[name] for r in self.runs)

    def delta_mib(self) -> float:
        """The step's peak over the process before the library prepared anything (torch
        imported, network built, runtime primed): what the library and the step cost. The
        idle process after the preparation is no fair baseline: lightstream's preparation
        leaves hundreds of MiB resident (its statistics pass), which would hide in it."""
        return statistics.median(step_over_baseline(r) for r in self.runs)

    def first(self, name: str, default: Any = None) -> Any:
        for run in self.runs:
            if name in run:
                return run[name]
        return default

    def load(self) -> str:
        loads = [r["load_1min"] for r in self.runs if "load_1min" in r]
        return f"{statistics.median(loads):.1f}" if loads else "–"


def step_over_baseline(result: Result) -> float:
    return result["peak_mib"] - result["before_prepare_mib"]


def aggregate(results: list[Result], role: str = "main") -> dict[Key, Row]:
    """Rows by configuration; each run is paired with the conventional (and, for
    lightstream, our) run of the same group and repeat, and the medians of the pair ratios
    are what the tables report, so noise common to neighbouring runs cancels."""
    runs = ok(results, role)
    rows: dict[Key, Row] = {}
    for run in runs:
        rows.setdefault(key_of(run), Row(key_of(run), [])).runs.append(run)
    partners = {(r["group"], r["repeat"], r["library"]): r for r in runs}
    for run in runs:
        row = rows[key_of(run)]
        conventional = partners.get((run["group"], run["repeat"], "conventional"))
        if conventional is not None and run["library"] != "conventional":
            row.vs_conventional.append(run["step_s"] / conventional["step_s"])
        ours = partners.get((run["group"], run["repeat"], "ours"))
        if ours is not None and run["library"] == "lightstream":
            row.vs_ours.append(run["step_s"] / ours["step_s"])
            row.memory_vs_ours.append(step_over_baseline(run) / step_over_baseline(ours))
    return rows


def ordered(rows: dict[Key, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: (r.key[0], r.key[1], r.key[2], LIBRARY_ORDER[r.key[3]]))


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


TIME_HEADER = (
    "| network | image | tile | library | tiles (fwd / bwd) | overlap | runs | prepare s | forward s | backward s "
    "| step s | step ÷ conv. | lightstream ÷ ours | baseline MiB | idle MiB | step peak MiB "
    "| step peak − baseline MiB | prepare peak MiB | process peak MiB | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def time_memory_table(rows: dict[Key, Row], failures: list[Result]) -> str:
    lines = [TIME_HEADER]
    for row in ordered(rows):
        network, size, tile, library = row.key
        streamed = library != "conventional"
        tiles = ""
        if streamed:
            forward_tiles = row.first("n_tiles")
            backward_tiles = row.first("backward_tiles", forward_tiles)
            tiles = f"{forward_tiles} / {backward_tiles}"
        lines.append(
            f"| {network} | {size}² | {tile if streamed else ''} | {library} | {tiles} "
            f"| {fmt(row.first('halo_factor'), 2) if streamed else ''} | {len(row.runs)} "
            f"| {fmt(row.median('prepare_s'), 3) if streamed else ''} | {row.median('forward_s'):.2f} "
            f"| {row.median('backward_s'):.2f} | {row.median('step_s'):.2f} "
            f"| {fmt(median_or_none(row.vs_conventional)) if streamed else '1'} "
            f"| {fmt(median_or_none(row.vs_ours)) if library == 'lightstream' else ''} "
            f"| {row.median('before_prepare_mib'):.0f} | {row.median('idle_mib'):.0f} | {row.median('peak_mib'):.0f} "
            f"| {row.delta_mib():.0f} "
            f"| {row.median('prepare_peak_mib'):.0f} | {row.median('process_peak_mib'):.0f} | {row.load()} |"
        )
    for failure in failures:
        lines.append(
            f"| {failure['network']} | {failure['height']}² | {failure['tile_size']} | {failure['library']} "
            f"| | | failed | {failure['error'][:160]} | | | | | | | | | | | | |"
        )
    return "\n".join(lines)


def grad_cells(run: Result | None, kinds: Iterable[str]) -> list[str]:
    """``max |Δ|`` (and the reference's max |value| in parentheses) per kind of gradient."""
    cells = []
    for kind in kinds:
        if run is None:
            cells.append("–")
        elif kind == "input" and "input_grad_error" in run:
            cells.append(f"error: {run['input_grad_error']}")
        elif f"grad_{kind}_maxdiff" in run:
            cells.append(f"{sci(run[f'grad_{kind}_maxdiff'])} ({sci(run[f'grad_{kind}_scale'])})")
        else:
            cells.append("–")
    return cells


def grad_table(results: list[Result]) -> str:
    """Gradient differences from the conventional step (computed in the same process, same
    weights and image) for the main configurations: parameters from the timed runs (first
    checked repeat), the input gradient from the separate input-gradient runs."""
    lines = [
        "| network | image | tile | library | dtype | output | conv weights | conv biases | norm params | head | input |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checked = [r for r in ok(results, "main") if "grad_weight_maxdiff" in r]
    inputs = {key_of(r): r for r in ok(results, "input-grad") if "grad_input_maxdiff" in r or "input_grad_error" in r}
    input_errors = {key_of(r): r for r in results if r.get("role") == "input-grad" and "error" in r}
    seen: set[Key] = set()
    for run in sorted(checked, key=lambda r: (r["network"], LIBRARY_ORDER[r["library"]])):
        if key_of(run) in seen:
            continue
        seen.add(key_of(run))
        input_run = inputs.get(key_of(run))
        input_cell = grad_cells(input_run, ["input"])[0]
        if input_run is None and key_of(run) in input_errors:
            input_cell = f"error: {input_errors[key_of(run)]['error'][:120]}"
        output = f"{sci(run.get('output_maxdiff'))}" if "output_maxdiff" in run else run.get("output_shape_mismatch", "–")
        lines.append(
            f"| {run['network']} | {run['height']}² | {run['tile_size']} | {run['library']} | {run['dtype']} | {output} | "
            + " | ".join(grad_cells(run, ("weight", "bias", "norm", "head")))
            + f" | {input_cell} |"
        )
    return "\n".join(lines)


def exactness_verdict(run: Result | None, tolerance: float) -> str:
    """"exact" when every gradient kind's max |Δ| is within ``tolerance`` relative to the
    reference's scale, else "WRONG" naming the worst kind; "error" with the message."""
    if run is None:
        return "not run"
    if "error" in run:
        return f"error: {run['error'][:200]}"
    worst, worst_kind = 0.0, ""
    for kind in GRAD_KINDS:
        if f"grad_{kind}_maxdiff" in run:
            relative = run[f"grad_{kind}_maxdiff"] / max(run[f"grad_{kind}_scale"], 1e-300)
            if relative > worst:
                worst, worst_kind = relative, kind
    problems = []
    if "output_shape_mismatch" in run:
        problems.append(f"output shape {run['output_shape_mismatch']}")
    elif "output_maxdiff" in run and run["output_maxdiff"] > tolerance * max(run["output_scale"], 1e-300):
        problems.append(f"output off by {run['output_maxdiff']:.1e}")
    if "input_grad_error" in run:
        problems.append(f"input gradient: {run['input_grad_error']}")
    if run.get("missing_grads"):
        problems.append(f"no gradient for {', '.join(run['missing_grads'][:3])}")
    if worst > tolerance:
        problems.append(f"{worst_kind} gradient off by {worst:.1e} of its scale")
    return "exact" if not problems else "WRONG: " + "; ".join(problems)


def exactness_table(results: list[Result], cases: dict[str, Any], tolerance: float) -> str:
    """Per case and library: max |Δ| of each gradient kind from the conventional step (the
    parameter-gradient run and the input-gradient run are separate processes) and a verdict."""
    runs = [r for r in results if r.get("role") == "exactness"]

    def find(case: str, library: str, input_grad: bool) -> Result | None:
        return next((r for r in runs if r["network"] == case and r["library"] == library and r["input_grad"] == input_grad), None)

    lines = [
        "| case | setting | library | conv weights | conv biases | norm params | head | input | verdict (parameters) | verdict (input gradient) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in cases.items():
        for library in ("ours", "lightstream"):
            params, inputs = find(name, library, False), find(name, library, True)
            if params is None and inputs is None:
                continue
            cells = grad_cells(params if params and "error" not in params else None, ("weight", "bias", "norm", "head"))
            input_cell = grad_cells(inputs if inputs and "error" not in inputs else None, ["input"])[0]
            lines.append(
                f"| {case.label} | {case.what} | {library} | " + " | ".join(cells) + f" | {input_cell} "
                f"| {exactness_verdict(params, tolerance)} | {exactness_verdict(inputs, tolerance)} |"
            )
    return "\n".join(lines)


def speed_verdict(rows: dict[Key, Row], network: str, size: int, tile: int) -> Verdict:
    name = f"{network} {size}², tile {tile}: lightstream step ÷ our step"
    row = rows.get((network, size, tile, "lightstream"))
    ratio = median_or_none(row.vs_ours) if row else None
    if ratio is None:
        return Verdict(name, None, f"≥ {TARGET_SPEEDUP}", None, "a run is missing.", digits=2)
    ours = rows[(network, size, tile, "ours")]
    detail = (
        f"paired ratios {[round(v, 2) for v in row.vs_ours]}; median steps {row.median('step_s'):.2f} s "
        f"(lightstream) vs {ours.median('step_s'):.2f} s (ours)"
    )
    conventional = rows.get((network, size, tile, "conventional"))
    if conventional is not None:
        detail += f" vs {conventional.median('step_s'):.2f} s (conventional)"
    return Verdict(name, ratio, f"≥ {TARGET_SPEEDUP}", ratio >= TARGET_SPEEDUP, detail + ".", digits=2)


def memory_verdict(rows: dict[Key, Row], network: str, size: int, tile: int) -> Verdict:
    name = f"{network} {size}², tile {tile}: our step memory ÷ lightstream's (step peak − baseline)"
    ours, peer = rows.get((network, size, tile, "ours")), rows.get((network, size, tile, "lightstream"))
    if ours is None or peer is None:
        return Verdict(name, None, "≤ 1", None, "a run is missing.", digits=2)
    ratio = ours.delta_mib() / peer.delta_mib()
    detail = (
        f"step peak − baseline {ours.delta_mib():.0f} vs {peer.delta_mib():.0f} MiB; absolute step peaks "
        f"{ours.median('peak_mib'):.0f} vs {peer.median('peak_mib'):.0f} MiB; process peaks including the "
        f"preparation {ours.median('process_peak_mib'):.0f} vs {peer.median('process_peak_mib'):.0f} MiB."
    )
    return Verdict(name, ratio, "≤ 1", ratio <= 1.0, detail, digits=2)


def plot(rows: dict[Key, Row], path: Path) -> None:
    """Bars per network: step time, step memory over idle, and preparation time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({row.key[:3] for row in rows.values()})
    libraries = ["conventional", "ours", "lightstream"]
    colours = {"conventional": "#999999", "ours": "#1f77b4", "lightstream": "#ff7f0e"}
    metrics = [
        ("step s", lambda r: r.median("step_s")),
        ("step peak − baseline (MiB)", lambda r: r.delta_mib()),
        ("tiling preparation s (log)", lambda r: max(r.median("prepare_s"), 1e-4)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    width = 0.27
    for axis, (title, value) in zip(axes, metrics):
        for index, library in enumerate(libraries):
            if title.startswith("tiling") and library == "conventional":
                continue
            xs, ys = [], []
            for position, config in enumerate(configs):
                row = rows.get((*config, library))
                if row is not None:
                    xs.append(position + (index - 1) * width)
                    ys.append(value(row))
            bars = axis.bar(xs, ys, width, label=library, color=colours[library])
            axis.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in bars.datavalues], fontsize=7)
        axis.set_xticks(range(len(configs)))
        axis.set_xticklabels([f"{NETWORK_LABELS.get(c[0], c[0]).split(' (')[0]}\n{c[1]}², tile {c[2]}" for c in configs], fontsize=8)
        axis.set_title(title)
        if title.startswith("tiling"):
            axis.set_yscale("log")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("lightning_streaming vs lightstream 1.0.7: one training step (medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
