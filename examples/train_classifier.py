"""Train a streaming classifier with the Lightning Trainer on generated large images.

Run: ``python examples/train_classifier.py`` (1024 x 1024 images, under a minute on 2 CPU
cores), or e.g. ``--size 4096 --tile 1024 --steps 60``, ``--devices 2`` (two processes
with "streaming_ddp"), ``--tile auto --memory-budget 256MiB``, ``--accelerator gpu --precision bf16-mixed``
(mixed precision pays on a GPU; on a CPU keep the default float32).

The task: an image shows a textured background; class 1 images also contain one small
bright "lesion" at a random place, a few dozen pixels wide, so the label depends on a
tiny part of a large image (as in whole-slide pathology). Images are uint8 and stay on the
host (``input_on_host``); each tile is normalised to float on its way to the trunk
(``tile_transform``). The trunk is a few convolutions, streamed tile by tile; the head is
global max pooling and a linear layer.
"""

from __future__ import annotations

import argparse
import logging
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_streaming as ls


class LesionImages(Dataset):
    """``length`` uint8 images of ``size`` x ``size``, label 1 when a bright lesion is present.

    Generated from the index, so every process and every epoch sees the same images.
    """

    def __init__(self, length: int, size: int, seed: int = 0) -> None:
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        label = index % 2
        # Background: smooth blotches (noise upsampled 16x) plus pixel noise.
        coarse = torch.rand(3, self.size // 16 + 1, self.size // 16 + 1, generator=generator)
        background = F.interpolate(coarse[None], scale_factor=16, mode="bilinear")[0, :, : self.size, : self.size]
        image = 60 + 80 * background + 20 * torch.rand(3, self.size, self.size, generator=generator)
        if label:
            radius = 12
            cy, cx = (torch.randint(radius, self.size - radius, (2,), generator=generator)).tolist()
            yy, xx = torch.meshgrid(torch.arange(2 * radius), torch.arange(2 * radius), indexing="ij")
            disc = ((yy - radius + 0.5) ** 2 + (xx - radius + 0.5) ** 2) < radius**2
            patch = image[:, cy - radius : cy + radius, cx - radius : cx + radius]
            patch[:, disc] = torch.tensor([230.0, 90.0, 200.0])[:, None]  # a magenta spot
        return image.clamp(0, 255).to(torch.uint8), label


class LesionClassifier(ls.StreamingMixin, pl.LightningModule):
    """Streamed trunk (local layers only), conventional head (global max pool, linear)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))

    def tile_transform(self, tile: Tensor) -> Tensor:
        # Per pixel, on the tile's device: the full float image never exists.
        return (tile.to(self.dtype) - 128.0) / 64.0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--tile", default="512", help="tile side in pixels, or 'auto' (default 512)")
    parser.add_argument(
        "--memory-budget", default="256MiB", help="memory the streamed trunk may add to a step, for --tile auto"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1, help="processes; more than 1 uses 'streaming_ddp'")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="on a GPU e.g. bf16-mixed or 16-mixed; keep "
                        "32-true on a CPU, where bf16 is usually much slower")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads per process (default 1: steady on a busy 2-core machine; 0: torch's default)",
    )  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = logging.getLogger("lightning_streaming")  # reports the plan 'auto' makes
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())
    tile: int | str = args.tile if args.tile == "auto" else int(args.tile)
    streaming = dict(tile_size=tile, input_on_host=True)
    if tile == "auto":
        streaming["memory_budget"] = args.memory_budget
    strategy = (
        ls.StreamingDDPStrategy(**streaming, process_group_backend="gloo" if args.accelerator == "cpu" else None)
        if args.devices > 1
        else ls.StreamingStrategy(**streaming)
    )
    model = LesionClassifier()
    train = DataLoader(
        LesionImages(args.train_images, args.size, seed=0), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers,
    )  # fmt: skip
    val = DataLoader(LesionImages(args.val_images, args.size, seed=1), batch_size=args.batch_size, num_workers=args.workers)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        enable_progress_bar=args.progress,
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    train_loss = float(trainer.callback_metrics["train_loss"])
    metrics = trainer.validate(model, val, verbose=False)[0]

    if trainer.is_global_zero:
        shape = (args.batch_size, 3, args.size, args.size)
        if tile == "auto":  # the plan the strategy made
            half = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision.split("-")[0])
            tile = ls.stream_plan(
                model.trunk, shape, memory_budget=args.memory_budget, input_dtype=torch.uint8, activation_dtype=half,
                device=trainer.strategy.root_device,
            ).tile_size
        plan = ls.tile_plan(model.trunk, shape, tile)
        tiles = f"{len(plan)} tiles of at most {tile} px (grid {plan.grid}, largest input region {plan.largest_region} px)"
        print(
            f"\nTrained a streaming classifier for {trainer.global_step} steps on {args.size}x{args.size} uint8 images "
            f"({args.devices} process(es), {args.precision}) in {seconds:.1f} s.\n"
            f"Each image was streamed as {tiles}; the trunk's output is "
            f"{tuple(ls.tile_plan(model.trunk, (1, 3, args.size, args.size), args.size).output_shape)} per image.\n"
            f"Last training loss {train_loss:.3f}; "
            f"validation on {args.val_images} new images: loss {metrics['val_loss']:.3f}, "
            f"accuracy {metrics['val_acc']:.2f}."
        )


if __name__ == "__main__":
    main()
