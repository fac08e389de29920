"""Dense prediction, streamed: a whole U-Net trained tile by tile on a real slide, its output
at the input's full resolution.

Run: ``python examples/segmentation.py`` (a few minutes on 2 CPU cores; the first run
fetches the example slides with pip into ``.data/``). Options: ``--spacing``, ``--crop``,
``--tile``, ``--steps``, ``--out``.

What it does:

1. Reads CMU-1-Small-Region (a real Aperio H&E slide) at ``--spacing`` um/px and makes the
   target: its tissue mask *at that resolution* (blurred grey level below Otsu's threshold,
   then an opening), one label per pixel.
2. Trains a U-Net (max-pooled encoder, transposed-convolution decoder, skip connections
   concatenated) on random crops with ``StreamingStrategy``: the *whole* U-Net is the
   streamed trunk (the head is the identity), so every training step runs tile by tile,
   with the exact gradients of the un-tiled network and a tile's memory.
3. Predicts the whole slide streamed, checks it against the conventional forward (the
   largest difference), scores it against the target (Dice, pixel accuracy) and writes
   ``results/segmentation/prediction.png`` (image, target, prediction side by side) and
   ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_streaming as ls

REPO = Path(__file__).resolve().parent.parent


def double_conv(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out, out, 3, padding=1), nn.ReLU(inplace=True))  # fmt: skip


class UNet(nn.Module):
    """A U-Net of ``depth`` levels: two 3x3 convolutions per level, 2x2 max pooling down,
    2x2 transposed convolutions up, skip connections concatenated; output at the input's
    resolution (input sizes divisible by ``2**depth``)."""

    def __init__(self, classes: int = 2, width: int = 8, depth: int = 3):
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(3, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)


class TissueSegmenter(ls.StreamingMixin, pl.LightningModule):
    """The whole U-Net is the streamed trunk; per-pixel cross-entropy against the mask."""

    def __init__(self, mean: list[float], std: list[float], lr: float = 3e-3, depth: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.trunk = UNet(depth=depth)
        self.head = nn.Identity()
        self.tile_transform = ls.Uint8Normalize(mean, std)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = F.cross_entropy(self(images), masks)
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=len(masks))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class RandomCrops(Dataset):
    """Random ``size`` x ``size`` crops of one uint8 image and its mask (seeded per index)."""

    def __init__(self, image: torch.Tensor, mask: torch.Tensor, size: int, count: int):
        self.image, self.mask, self.size, self.count = image, mask, size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        h, w = self.mask.shape
        y = int(torch.randint(0, h - self.size + 1, (), generator=generator))
        x = int(torch.randint(0, w - self.size + 1, (), generator=generator))
        window = (slice(y, y + self.size), slice(x, x + self.size))
        return self.image[(slice(None), *window)], self.mask[window].long()


def tissue_target(slide: ls.Slide, spacing: float) -> torch.Tensor:
    """The tissue mask at the training resolution itself, one label per pixel."""
    mask = ls.detect_tissue(slide, spacing, threshold="otsu", blur=4 * spacing, opening=8 * spacing)
    return mask.mask


def dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    both = (prediction & target).sum().item()
    return 2 * both / max(1, prediction.sum().item() + target.sum().item())


def side_by_side(image: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor, scores: dict) -> Image.Image:
    """Image | target | prediction, masks tinted over the image, with titles."""
    rgb = image.permute(1, 2, 0).numpy()

    def tinted(mask: torch.Tensor) -> np.ndarray:
        out = rgb.astype(np.float32).copy()
        out[mask.numpy()] = 0.45 * out[mask.numpy()] + 0.55 * np.array([0, 150, 255])
        return out.astype(np.uint8)

    panels = [rgb, tinted(target), tinted(prediction)]
    titles = ["slide", "target: tissue mask (blue)", f"streamed U-Net (blue): Dice {scores['dice']:.3f}"]
    h, w = rgb.shape[:2]
    try:
        font = ImageFont.load_default(size=max(14, w // 28))
    except TypeError:  # Pillow < 10.1 has one size only
        font = ImageFont.load_default()
    top = max(30, w // 14)
    canvas = Image.new("RGB", (3 * w + 40, h + top + 6), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(Image.fromarray(panel), (10 + i * (w + 10), top))
        draw.text((10 + i * (w + 10), top // 5), title, fill="black", font=font)
    return canvas


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0, help="um per pixel (default 2.0)")
    parser.add_argument("--crop", type=int, default=256, help="training crop size in pixels (default 256)")
    parser.add_argument("--tile", type=int, default=160, help="streaming tile size (default 160)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--depth", type=int, default=3, help="U-Net levels (default 3)")
    parser.add_argument("--data", type=Path, default=REPO / ".data", help="where the slides are cached")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "segmentation", help="output folder")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The slide at the training resolution, cut to a multiple of the U-Net's stride, and its target.
    slides = ls.example_slides(args.data)
    slide = ls.Slide(slides.cmu_small_region)
    stride = 2**args.depth
    image = slide.read(args.spacing)
    target = tissue_target(slide, args.spacing)
    h, w = (image.shape[1] // stride) * stride, (image.shape[2] // stride) * stride
    image, target = image[:, :h, :w].contiguous(), target[:h, :w].contiguous()
    mean = (image.float().mean((1, 2)) / 255).tolist()
    std = (image.float().std((1, 2)) / 255).tolist()
    print(f"slide {slide.path.name} at {args.spacing:g} um/px: {w} x {h} px; target: tissue in "
          f"{100 * target.float().mean():.0f}% of the pixels")  # fmt: skip

    # 2. Train the whole U-Net streamed.
    model = TissueSegmenter(mean, std, depth=args.depth)
    plan = ls.tile_plan(model.trunk, (2, 3, args.crop, args.crop), args.tile)
    print(f"training on {args.crop} x {args.crop} crops, batch 2: {len(plan)} tiles of at most {args.tile} px "
          f"(largest region {plan.largest_region}), output {plan.output_shape} = the input's resolution")
    data = DataLoader(RandomCrops(image, target, args.crop, 2 * args.steps), batch_size=2, shuffle=False)
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=args.tile), max_steps=args.steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=args.progress, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    first, last = np.mean(model.losses[:5]), np.mean(model.losses[-5:])
    print(f"trained {len(model.losses)} steps in {seconds:.0f} s; loss {first:.3f} (first 5 steps) -> {last:.3f} "
          "(last 5; 0.693 is guessing)")

    # 3. Predict the whole slide streamed; check it against the conventional forward; score it.
    model.eval()
    with torch.no_grad():
        logits = ls.stream(model.trunk, image.unsqueeze(0), 2 * args.tile, transform=model.tile_transform)
        conventional = model.trunk(model.tile_transform(image.unsqueeze(0)))
    difference = (logits - conventional).abs().max().item()
    prediction = logits.argmax(1)[0].bool()
    truth = target.bool()
    scores = {
        "dice": dice(prediction, truth),
        "pixel_accuracy": (prediction == truth).float().mean().item(),
        "streamed_vs_conventional_max_abs_difference": difference,
        "steps": len(model.losses),
        "loss_first_5": float(first),
        "loss_last_5": float(last),
        "train_seconds": seconds,
        "image": [h, w],
        "spacing": args.spacing,
    }
    side_by_side(image, truth, prediction, scores).save(args.out / "prediction.png")
    (args.out / "metrics.json").write_text(json.dumps(scores, indent=2))
    print(f"whole slide predicted streamed: Dice {scores['dice']:.3f}, pixel accuracy "
          f"{scores['pixel_accuracy']:.3f}; largest difference from the conventional forward {difference:.1e}")
    print(f"wrote {args.out / 'prediction.png'} and {args.out / 'metrics.json'}")
    return scores


if __name__ == "__main__":
    main()
