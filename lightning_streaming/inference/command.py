"""``lightning-streaming predict``: predict slides with a trained model and write the results."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Predict whole slides (or JPEG/PNG/TIFF images) with a trained StreamingMixin model: each slide is read "
        "lazily at --spacing, its tissue streamed tile by tile; writes predictions.csv and predictions.json, and "
        "per slide and heatmap a .npy, an overlay .png and a .geojson of the high-scoring regions for QuPath."
    )
    parser.epilog = (
        "example: lightning-streaming predict --checkpoint results/demo/model.ckpt "
        "--model examples.slide_demo:SlideClassifier slide1.svs slide2.svs --output predictions/"
    )
    parser.add_argument("slides", nargs="*", type=Path, help="slide or image files")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the trained model's checkpoint (.ckpt)")
    parser.add_argument("--model", required=True, help="the model's class as module:Class, e.g. "
                        "examples.slide_demo:SlideClassifier (importable from the current folder)")  # fmt: skip
    parser.add_argument("--manifest", type=Path, help="a CSV with a 'slide' column (paths relative to it; optional "
                        "'base_spacing', and target columns reported beside the predictions)")  # fmt: skip
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder to write the results to")
    parser.add_argument("--spacing", type=float, help="um per pixel to read slides at (default: the model's training "
                        "spacing)")  # fmt: skip
    parser.add_argument("--heatmaps", nargs="*", default=["saliency", "cam"], metavar="KIND",
                        help="heatmaps to make: saliency, cam, attention (none: give the flag without values; "
                        "default: saliency cam)")  # fmt: skip
    parser.add_argument("--heatmap-spacing", type=float, help="um per heatmap pixel (default: about 1024 px on a "
                        "slide's long side)")  # fmt: skip
    parser.add_argument("--tile-size", type=int, help="tile size of the streamed forward (default: the planner's "
                        "fastest plan within --memory-budget)")  # fmt: skip
    parser.add_argument("--saliency-tile-size", type=int, help="tile size of the saliency backward (default: "
                        "--tile-size, else the largest within --memory-budget)")  # fmt: skip
    parser.add_argument("--memory-budget", help="memory the streamed trunk may use when tiles are chosen, e.g. 2GiB "
                        "(default: a quarter of the memory available)")  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--base-spacing", type=float, help="um per pixel of images that record none (default: the "
                        "model's spacing)")  # fmt: skip
    parser.add_argument("--no-tissue", action="store_true", help="predict whole slides, not their tissue only")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity of the strongest values (0..1)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")


def _jobs(args: argparse.Namespace, classes: list[str] | None) -> list[tuple[Path, float | None, str | None]]:
    """(slide, base spacing, target) for each slide to predict."""
    jobs = [(Path(s), args.base_spacing, None) for s in args.slides]
    if args.manifest is not None:
        from ..data.manifest import Manifest

        manifest = Manifest.read(args.manifest, require_targets=False, classes=classes or None, check_files=False)
        for row in manifest.rows:
            if isinstance(row.target, int) and manifest.classes:
                target = manifest.classes[row.target]
            else:
                target = None if row.target is None else ", ".join(f"{v:g}" for v in row.target.tolist())
            jobs.append((row.slide, row.base_spacing or args.base_spacing, target))
    return jobs


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.slides and args.manifest is None:
        print("lightning-streaming predict: give slide files, or --manifest CSV", file=sys.stderr)
        return 2
    import torch

    from ..data.tissue import TissueDetection
    from .checkpoint import load_model
    from .explain import check_heatmap_kinds
    from .outputs import prepare_output_dir, write_predictions
    from .predict import predict_slide
    from .progress import progress_bar
    from ..lightning.info import model_info

    from ..data.errors import SlideError
    from .checkpoint import CheckpointError
    from .outputs import OutputError

    try:
        out_dir = prepare_output_dir(args.output)  # before any work: a folder that cannot be written fails at once
        device = torch.device(args.device or "cpu")
        model = load_model(args.checkpoint, args.model, map_location=device)
        info = model_info(model)
        heatmaps = check_heatmap_kinds(args.heatmaps, model.streaming_split()[1])
        jobs = _jobs(args, info.classes)
    except (CheckpointError, OutputError, SlideError, ImportError, ValueError, RuntimeError) as error:
        print(f"lightning-streaming predict: error: {error}", file=sys.stderr)
        return 2
    say = (lambda *a: None) if args.quiet else print
    say(f"model: {type(model).__name__} from {args.checkpoint}; classes {info.classes}; trained at "
        f"{info.spacing if info.spacing is not None else '?'} um/px; task {info.task}")  # fmt: skip
    predictions, failed = [], []
    for index, (slide, base_spacing, target) in enumerate(jobs, 1):
        label = f"[{index}/{len(jobs)}] {slide.name}"
        try:
            with progress_bar(label, enabled=args.progress and not args.quiet) as progress:
                prediction = predict_slide(
                    model, slide, args.spacing, heatmaps=heatmaps, heatmap_spacing=args.heatmap_spacing,
                    tile_size=args.tile_size, saliency_tile_size=args.saliency_tile_size,
                    memory_budget=args.memory_budget, base_spacing=base_spacing,
                    tissue=None if args.no_tissue else TissueDetection(), progress=progress,
                )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - one bad slide must not stop the others
            failed.append(slide)
            print(f"error: {slide}: {error}", file=sys.stderr)
            continue
        prediction.target = target
        predictions.append(prediction)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in (prediction.probabilities or prediction.values or {}).items())
        say(f"{label}: {prediction.label} ({shown}) in {prediction.seconds:.1f} s")
    if predictions:
        paths = write_predictions(predictions, out_dir, opacity=args.opacity)
        say(f"wrote {paths[0]['csv']}, {paths[0]['json']}" + (f" and {sum(len(p) - 2 for p in paths)} heatmap files"
            if heatmaps else "") + f" in {out_dir}")  # fmt: skip
    if failed:
        print(f"{len(failed)} of {len(jobs)} slide(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0
