"""Aggregation (medians, paired ratios), markdown tables, target verdicts and plots."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench_networks import NETWORK_LABELS

Result = dict[str, Any]
Key = tuple[str, int, int, str, int]  # network, size, tile, mode, keep_graphs
TARGET_BOUND_RATIO = 1.3
TARGET_MEMORY_SAVING = 6.0
TARGET_TIME_RATIO = 1.2


def key_of(result: Result) -> Key:
    return (result["network"], result["height"], result["tile_size"], result["mode"], result["keep_graphs"])


def delta_mib(result: Result) -> float:
    """The step's peak over the idle process (before the image was created)."""
    return result["peak_mib"] - result["idle_mib"]


@dataclass
class Row:
    """Medians over the repeats of one configuration, plus paired ratios to conventional."""

    key: Key
    runs: list[Result]
    time_ratios: list[float] = field(default_factory=list)
    peak_ratios: list[float] = field(default_factory=list)
    delta_ratios: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        if name == "delta_mib":
            return statistics.median(delta_mib(r) for r in self.runs)
        return statistics.median(r[name] for r in self.runs)

    @property
    def first(self) -> Result:
        return self.runs[0]

    @staticmethod
    def ratio(values: list[float]) -> float | None:
        return statistics.median(values) if values else None


def ok_results(results: Iterable[Result]) -> list[Result]:
    return [r for r in results if "error" not in r]


def aggregate(results: list[Result], roles: Iterable[str] = ("main",)) -> dict[Key, Row]:
    """Rows keyed by configuration, from the runs of ``roles``. Each streamed run (any mode
    but conventional) is paired with the conventional run of the same group and repeat
    (they ran next to each other), and the ratios of the pairs are kept, so noise common to
    a pair cancels."""
    results = [r for r in ok_results(results) if r["role"] in set(roles)]
    rows: dict[Key, Row] = {}
    for result in results:
        rows.setdefault(key_of(result), Row(key_of(result), [])).runs.append(result)
    conventional = {
        (r["group"], r["repeat"], r["network"], r["height"]): r
        for r in results
        if r["mode"] == "conventional"
    }
    for result in results:
        partner = conventional.get((result["group"], result["repeat"], result["network"], result["height"]))
        if result["mode"] == "conventional" or partner is None:
            continue
        row = rows[key_of(result)]
        row.time_ratios.append(result["step_s"] / partner["step_s"])
        row.peak_ratios.append(result["peak_mib"] / partner["peak_mib"])
        row.delta_ratios.append(delta_mib(result) / delta_mib(partner))
    return rows


def conventional_row(rows: dict[Key, Row], network: str, size: int, tile: int) -> Row | None:
    return rows.get((network, size, tile, "conventional", 0))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _grid(result: Result) -> str:
    return "×".join(str(g) for g in result["grid"])


MAIN_HEADER = (
    "| network | image | tile | grid | halo | mode | warm-up | runs | forward s | backward s | step s "
    "| peak MiB | peak − idle MiB | time s/c | peak s/c | (peak − idle) s/c | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main_table(rows: dict[Key, Row], skipped: list[Result]) -> str:
    """One line per (network, size, mode) with keep_graphs = 0, and the skipped runs."""
    lines = [MAIN_HEADER]
    entries = [(row.key, _main_line(row)) for row in rows.values() if row.key[4] == 0]
    entries += [((s["network"], s["height"], s["tile_size"], s["mode"], 0), _skipped_line(s)) for s in skipped]
    order = {"conventional": 0, "streamed": 1}
    entries.sort(key=lambda e: (e[0][0], e[0][1], order[e[0][3]]))
    lines += [line for _, line in entries]
    return "\n".join(lines)


def _main_line(row: Row) -> str:
    r = row.first
    is_streamed = r["mode"] == "streamed"
    return (
        f"| {r['network']} | {r['height']}² | {r['tile_size']} | {_grid(r)} "
        f"| {_fmt(r.get('halo_factor'), 3) if is_streamed else ''} | {r['mode']} "
        f"| {'full step' if r['full_warmup'] else 'tiny step'} | {len(row.runs)} "
        f"| {row.median('forward_s'):.2f} | {row.median('backward_s'):.2f} | {row.median('step_s'):.2f} "
        f"| {row.median('peak_mib'):.0f} | {row.median('delta_mib'):.0f} "
        f"| {_fmt(row.ratio(row.time_ratios)) if is_streamed else ''} "
        f"| {_fmt(row.ratio(row.peak_ratios), 3) if is_streamed else ''} "
        f"| {_fmt(row.ratio(row.delta_ratios), 3) if is_streamed else ''} | {_load(row)} |"
    )


def _load(row: Row) -> str:
    """The machine's 1-minute load average after the step (median over runs)."""
    loads = [r["load_1min"] for r in row.runs if "load_1min" in r]
    return f"{statistics.median(loads):.1f}" if loads else "–"


def _skipped_line(s: Result) -> str:
    return (
        f"| {s['network']} | {s['height']}² | {s['tile_size']} | | | {s['mode']} | | 0 "
        f"| {s['reason']} | | | | | | | | |"
    )


def sweep_rows(rows: dict[Key, Row], network: str, size: int, tile: int) -> list[Row]:
    """The streamed rows of the keep_graphs sweep at ``size``, by keep_graphs."""
    found = [r for k, r in rows.items() if k[:3] == (network, size, tile) and k[3] == "streamed"]
    return sorted(found, key=lambda r: r.key[4])


def sweep_table(rows: dict[Key, Row], networks: list[str], size: int, tile: int) -> str:
    lines = [
        "| network | keep_graphs | runs | step s | peak MiB | peak − idle MiB | time s/c | (peak − idle) s/c | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for network in networks:
        conv = conventional_row(rows, network, size, tile)
        if conv is not None:
            lines.append(
                f"| {network} | conventional | {len(conv.runs)} | {conv.median('step_s'):.2f} "
                f"| {conv.median('peak_mib'):.0f} | {conv.median('delta_mib'):.0f} | 1 | 1 | {_load(conv)} |"
            )
        for row in sweep_rows(rows, network, size, tile):
            lines.append(
                f"| {network} | {row.key[4]} | {len(row.runs)} | {row.median('step_s'):.2f} "
                f"| {row.median('peak_mib'):.0f} | {row.median('delta_mib'):.0f} "
                f"| {_fmt(row.ratio(row.time_ratios))} | {_fmt(row.ratio(row.delta_ratios), 3)} | {_load(row)} |"
            )
    return "\n".join(lines)


@dataclass
class Verdict:
    name: str
    value: float | None
    target: str
    met: bool | None
    detail: str
    digits: int = 3

    def line(self) -> str:
        status = "not measured" if self.met is None else ("MET" if self.met else "MISSED")
        return f"- **{self.name}**: {_fmt(self.value, self.digits)} (target {self.target}) — **{status}**. {self.detail}"


def bound_verdict(rows: dict[Key, Row], results: list[Result], network: str, size: int, tile: int) -> Verdict:
    """Streamed peak against idle + input + output + output gradient + one tile's
    conventional step (a conventional run at the plan's largest region: peak − ready)."""
    name = f"{network} {size}² streamed peak / bound"
    streamed = rows.get((network, size, tile, "streamed", 0))
    reference = [
        r for r in ok_results(results)
        if r["role"] == "tile-reference" and r["network"] == network and r["for_size"] == size
    ]  # fmt: skip
    if streamed is None or not reference:
        return Verdict(name, None, f"≤ {TARGET_BOUND_RATIO}", None, "streamed run or tile reference missing.")
    s = streamed.first
    tile_step = statistics.median(r["peak_mib"] - r["ready_mib"] for r in reference)
    data = (s["input_bytes"] + 2 * s["output_bytes"]) / 2**20
    bound = streamed.median("idle_mib") + data + tile_step
    ratio = streamed.median("peak_mib") / bound
    region = f"{reference[0]['height']}×{reference[0]['width']}"
    detail = (
        f"peak {streamed.median('peak_mib'):.0f} MiB; bound {bound:.0f} MiB = idle {streamed.median('idle_mib'):.0f} "
        f"+ input, output and output gradient {data:.0f} + one tile's conventional step {tile_step:.0f} "
        f"(conventional run at the largest region {region}, peak − ready, median of {len(reference)})."
    )
    return Verdict(name, ratio, f"≤ {TARGET_BOUND_RATIO}", ratio <= TARGET_BOUND_RATIO, detail)


def saving_verdict(rows: dict[Key, Row], network: str, size: int, tile: int) -> Verdict:
    name = f"{network} {size}² conventional peak / streamed peak"
    conv = conventional_row(rows, network, size, tile)
    streamed = rows.get((network, size, tile, "streamed", 0))
    if conv is None or streamed is None:
        return Verdict(name, None, f"≥ {TARGET_MEMORY_SAVING}", None, "a run is missing.")
    ratio = conv.median("peak_mib") / streamed.median("peak_mib")
    delta = conv.median("delta_mib") / streamed.median("delta_mib")
    detail = (
        f"absolute peaks {conv.median('peak_mib'):.0f} / {streamed.median('peak_mib'):.0f} MiB; "
        f"over the idle process {conv.median('delta_mib'):.0f} / {streamed.median('delta_mib'):.0f} MiB = {delta:.2f}×."
    )
    return Verdict(name, ratio, f"≥ {TARGET_MEMORY_SAVING}", ratio >= TARGET_MEMORY_SAVING, detail)


def time_verdict(rows: dict[Key, Row], network: str, size: int, tile: int) -> Verdict:
    name = f"{network} {size}² streamed step / conventional step (tile {tile})"
    streamed = rows.get((network, size, tile, "streamed", 0))
    ratio = streamed.ratio(streamed.time_ratios) if streamed else None
    if streamed is None or ratio is None:
        return Verdict(name, None, f"≤ {TARGET_TIME_RATIO}", None, "a run is missing.")
    conv = conventional_row(rows, network, size, tile)
    forward, backward = conv.median("forward_s"), conv.median("backward_s")
    model = streamed.first.get("halo_factor", 1.0) * (2 * forward + backward) / (forward + backward)
    detail = (
        f"median of {len(streamed.time_ratios)} paired ratios {[round(v, 2) for v in streamed.time_ratios]}; "
        f"recompute-only model, halo × (2·forward + backward) / (forward + backward) from the conventional "
        f"medians: {model:.2f}; "
        f"median steps {streamed.median('step_s'):.2f} s vs {conv.median('step_s'):.2f} s "
        f"(forward {streamed.median('forward_s'):.2f} vs {conv.median('forward_s'):.2f}, "
        f"backward {streamed.median('backward_s'):.2f} vs {conv.median('backward_s'):.2f})."
    )
    return Verdict(name, ratio, f"≤ {TARGET_TIME_RATIO}", ratio <= TARGET_TIME_RATIO, detail)


def plot_memory_vs_size(rows: dict[Key, Row], path: Path) -> None:
    """Peak memory (absolute, and over the idle process) against image side, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows.values():
        if row.key[4] == 0:
            series[(row.key[0], row.key[3])].append(row)
    for (network, mode), found in sorted(series.items()):
        found.sort(key=lambda r: r.key[1])
        sizes = [r.key[1] for r in found]
        style = "-o" if mode == "streamed" else "--s"
        for axis, metric in zip(axes, ("peak_mib", "delta_mib")):
            axis.plot(sizes, [r.median(metric) for r in found], style, label=f"{NETWORK_LABELS[network]}, {mode}")
    for axis, title in zip(axes, ("peak RSS", "peak RSS − idle process")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("image side (pixels)")
        axis.set_ylabel("MiB")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: dict[Key, Row], networks: list[str], size: int, tile: int, path: Path) -> None:
    """Time ratio against memory ratio (streamed / conventional) for each keep_graphs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.8))
    for network in networks:
        found = [r for r in sweep_rows(rows, network, size, tile) if r.time_ratios]
        if not found:
            continue
        memory = [r.ratio(r.delta_ratios) for r in found]
        time = [r.ratio(r.time_ratios) for r in found]
        axis.plot(memory, time, "-o", label=NETWORK_LABELS[network])
        for row, x, y in zip(found, memory, time):
            axis.annotate(str(row.key[4]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.axvline(1.0, color="grey", lw=0.8)
    axis.set_xlabel("memory, streamed / conventional (peak − idle)")
    axis.set_ylabel("step time, streamed / conventional")
    axis.set_title(f"keep_graphs trade-off, {size}² image, tile {tile} (labels: keep_graphs)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
