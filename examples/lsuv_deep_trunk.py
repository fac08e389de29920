"""Train a deep streamed trunk without BatchNorm, with and without StreamingLSUV.

Run: ``python examples/lsuv_deep_trunk.py`` (about a minute on 2 CPU cores), or e.g.
``--depth 20 --tile 112``, ``--steps 80``, ``--center``, ``--orthogonal``.

The trunk is a stride-2 stem and ``depth - 1`` 3x3 convolutions of ``width`` channels with
ReLU between them: no BatchNorm, no bias, PyTorch's default initialisation, under which
every layer shrinks the activations' standard deviation by about sqrt(6), so after 16
layers the signal has all but vanished (std ~1e-6 at the trunk's output). It is streamed
in tiles (2 x 2 for the default 128 x 128 images and 96 px tiles); the head is global
average pooling and a linear layer; the optimizer SGD with momentum, gradients clipped to
norm 1. The task: the image is noise, and the label says which colour channel is
brighter. The same model, data and optimizer are trained twice: once from the default
initialisation, once after StreamingLSUV rescaled every convolution, per output channel,
to unit std on the first training batches (statistics gathered tile by tile). The script
prints StreamingLSUV's per-layer table, the trunk output's std on the first batch, and
both loss curves.
"""

from __future__ import annotations

import argparse
import logging
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_streaming as ls


def deep_trunk(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    return nn.Sequential(*layers)


class DeepClassifier(ls.StreamingMixin, pl.LightningModule):
    """A deep BatchNorm-free trunk, global average pooling and a linear layer; records the
    training losses and the trunk output's std on the first batch when training starts."""

    def __init__(self, depth: int, width: int, lr: float) -> None:
        super().__init__()
        self.trunk = deep_trunk(depth, width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))
        self.lr = lr
        self.losses: list[float] = []
        self.start_std = float("nan")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if batch_idx == 0:
            with torch.no_grad():
                self.start_std = self.forward_trunk(x).std().item()
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def generated_batches(
    count: int, batch_size: int, size: int, seed: int = 0, shift: float = 1.0
) -> list[tuple[Tensor, Tensor]]:
    """Noise images; the label (0 or 1) names the colour channel that is ``shift`` brighter."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        y = torch.randint(0, 2, (batch_size,), generator=generator)
        x = torch.randn(batch_size, 3, size, size, generator=generator)
        x[torch.arange(batch_size), y] += shift
        batches.append((x, y))
    return batches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=16, help="convolutions in the trunk (default 16)")
    parser.add_argument("--width", type=int, default=16, help="channels per convolution (default 16)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--tile", type=int, default=96, help="tile size in pixels (default 96: 2 x 2 tiles)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, momentum 0.9 (default 0.02)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping, 0 for none (default 1.0)")
    parser.add_argument("--calibration-batches", type=int, default=10, help="LSUV batches (default 10, the paper's)")
    parser.add_argument("--center", action="store_true", help="LSUV also centres each channel (needs biases)")
    parser.add_argument("--orthogonal", action="store_true", help="orthonormal init before LSUV, as in its paper")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: fastest for small tiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    log = logging.getLogger("lightning_streaming")  # StreamingLSUV's per-layer table
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())
    batches = generated_batches(args.steps, args.batch_size, args.size, args.seed)
    plan = ls.tile_plan(deep_trunk(args.depth, args.width), batches[0][0].shape, args.tile)
    print(
        f"{args.depth} convolutions of {args.width} channels, no BatchNorm; {args.steps} steps of "
        f"{args.batch_size} x 3 x {args.size} x {args.size} images, streamed in {len(plan)} tiles "
        f"({plan.grid[0]} x {plan.grid[1]}) of at most {args.tile} px\n"
    )
    runs = {}
    for name in ("default init", "StreamingLSUV"):
        pl.seed_everything(args.seed, verbose=False)
        model = DeepClassifier(args.depth, args.width, args.lr)
        if args.center:  # centring subtracts the mean through the bias: give the convolutions one
            for conv in model.trunk:
                if isinstance(conv, nn.Conv2d):
                    conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        callbacks = []
        if name == "StreamingLSUV":
            callbacks.append(
                ls.StreamingLSUV(
                    num_batches=args.calibration_batches, center=args.center, orthogonal_init=args.orthogonal
                )
            )
        trainer = pl.Trainer(
            strategy=ls.StreamingStrategy(tile_size=args.tile),
            accelerator="cpu",
            max_epochs=1,
            gradient_clip_val=args.clip or None,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=args.progress,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(model, DataLoader(batches, batch_size=None))
        runs[name] = (model, time.perf_counter() - start)

    print(f"\n{'':>14}" + "".join(f"{name:>16}" for name in runs))
    print(f"{'output std':>14}" + "".join(f"{model.start_std:>16.3g}" for model, _ in runs.values()))
    print(f"{'fit seconds':>14}" + "".join(f"{seconds:>16.1f}" for _, seconds in runs.values()))
    print("mean training loss (cross-entropy; chance level ln 2 = 0.693):")
    every = 5
    for first in range(0, args.steps, every):
        row = f"{f'steps {first + 1}-{min(first + every, args.steps)}':>14}"
        for model, _ in runs.values():
            part = model.losses[first : first + every]
            row += f"{sum(part) / len(part):>16.3f}"
        print(row)


if __name__ == "__main__":
    main()
