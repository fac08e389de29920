"""Whole-slide prediction and a streamed saliency heatmap of a slide larger than this machine
could hold as a float tensor, in bounded memory.

Uses the generated 51200 x 51200 pyramidal TIFF of ``scripts/large_slide_step.py`` (built
and cached on first use, about 1 GB on disk; 29.3 GiB as float32) and that script's small
streamed classifier (seeded, untrained: this measures memory and time, not accuracy).
``ls.predict_slide`` finds the tissue on a coarse view, reads the tissue's bounding box at
0.5 um/px region by region (never whole, not even as uint8), streams the trunk without a
graph, then streams the saliency backward tile by tile, reducing each pixel's gradient
over channels and pooling it into the heatmap as soon as no later tile touches it. Prints
the sizes, the tiles chosen within ``--memory-budget``, the time of each pass and the
peak resident memory of the process, and writes the prediction and heatmap files.

    python scripts/large_slide_predict.py                          # 51200 x 51200 at 0.5 um/px
    python scripts/large_slide_predict.py --size 20480 --memory-limit 2   # a 2 GiB address space
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_slide_step import REPO, Classifier, build_slide  # noqa: E402

import lightning_streaming as ls  # noqa: E402
from lightning_streaming.inference.predict import inference_budget, saliency_tile_size_for  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=51200, help="slide side in pixels at 0.5 um/px")
    parser.add_argument("--memory-budget", default="512MiB", help="what the streamed trunk may use (default 512MiB)")
    parser.add_argument("--heatmaps", nargs="*", default=["saliency", "cam"])
    parser.add_argument("--data", type=Path, default=REPO / ".data")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "large_slide")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="cap the address space (RLIMIT_AS) at GIB, to play a smaller machine")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    slides = ls.example_slides(args.data)
    start = time.perf_counter()
    path = build_slide(args.data / "large" / f"mosaic-{args.size}.tiff", args.size, slides.cmu_small_region)
    print(f"slide: {path} ({path.stat().st_size / 1e9:.2f} GB on disk, ready in {time.perf_counter() - start:.0f} s)")
    if args.memory_limit is not None:
        limit = int(args.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(f"address space capped at {args.memory_limit:g} GiB (RLIMIT_AS), imports included")

    model = Classifier([0.80, 0.70, 0.80], [0.15, 0.20, 0.15]).eval()
    model.model_info = ls.ModelInfo(classes=["normal", "tumour"], spacing=0.5)
    slide = ls.Slide(path)
    height, width = slide.size(0.5)
    print(f"slide at 0.5 um/px: {width} x {height} px; as float32 {3 * 4 * height * width / 2**30:.1f} GiB, as uint8 "
          f"{3 * height * width / 2**30:.1f} GiB")  # fmt: skip

    before = peak_gib()
    timings: dict[str, float] = {}
    marks = [time.perf_counter(), time.process_time()]

    def progress(fraction: float, bar=None) -> None:
        if "forward" not in timings and fraction >= 1 / 3 - 1e-9 and "saliency" in args.heatmaps:
            timings["forward"] = time.perf_counter() - marks[0]
            timings["forward_cpu"] = time.process_time() - marks[1]
        if bar is not None:
            bar(fraction)

    from lightning_streaming.inference.progress import progress_bar

    with progress_bar("predicting", enabled=args.progress) as bar:
        start = time.perf_counter()
        marks[:] = [start, time.process_time()]
        prediction = ls.predict_slide(
            model, slide, 0.5, heatmaps=tuple(args.heatmaps), memory_budget=args.memory_budget,
            progress=lambda f: progress(f, bar),
        )  # fmt: skip
        elapsed, cpu = time.perf_counter() - start, time.process_time() - marks[1]
    (r0, r1), (c0, c1) = prediction.region
    shape = (1, 3, r1 - r0, c1 - c0)
    budget = inference_budget(model, args.memory_budget)
    saliency_tile = saliency_tile_size_for(model, shape, None, None, budget) if "saliency" in args.heatmaps else None
    forward_plan = ls.stream_plan(model.trunk, shape, memory_budget=budget, grad=False, input_dtype=torch.uint8)
    print(f"tissue box: {c1 - c0} x {r1 - r0} px ({(r1 - r0) * (c1 - c0) / 1e9:.2f} gigapixels, as float32 "
          f"{12 * (r1 - r0) * (c1 - c0) / 2**30:.1f} GiB); memory budget {args.memory_budget}: forward: {forward_plan}"
          + (f", saliency tiles of {saliency_tile} px ({len(ls.tile_plan(model.trunk, shape, saliency_tile))} tiles)"
             if saliency_tile else ""))  # fmt: skip
    forward, forward_cpu = timings.get("forward", elapsed), timings.get("forward_cpu", cpu)
    print(f"prediction: {prediction.label} {prediction.probabilities}; wall time (CPU time of the process): forward "
          f"{forward:.0f} s ({forward_cpu:.0f} s)"
          + (f", heatmaps {elapsed - forward:.0f} s ({cpu - forward_cpu:.0f} s)" if args.heatmaps else "")
          + f", {elapsed:.0f} s ({cpu:.0f} s) in all; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for kind, heatmap in prediction.heatmaps.items():
        values = heatmap.values
        print(f"  {kind}: {values.shape[1]} x {values.shape[0]} at {heatmap.spacing:.3g} um/px, "
              f"{np.count_nonzero(values)} non-zero pixels, max {values.max():.3g}")
    peak = peak_gib()
    print(f"peak resident memory of the process: {peak:.2f} GiB (before predicting: {before:.2f} GiB); the tissue "
          f"box as float32 would be {12 * (r1 - r0) * (c1 - c0) / 2**30:.1f} GiB")  # fmt: skip
    paths = ls.write_prediction(prediction, args.out)
    print(f"wrote {paths['csv']} and {', '.join(str(p) for k, p in paths.items() if k.endswith('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
