"""A streamed network can use resolution: validation AUC of the same network trained on the
same fields of view at several input resolutions.

Run from the repository root: ``python examples/resolution/run.py`` (1024^2 fields seen at
256^2, 512^2 and 1024^2; a few minutes on 2 CPU cores). Larger settings by flags, e.g.
``--seeds 0 1 2``, ``--epochs 10 --train-images 64``, or ``--size 2048 --factors 8 4 2 1``
(a field four times the area, lesions of the same size in full-resolution pixels, streamed
in 5 x 5 tiles of 512). The task's knobs are flags too (``--max-lesions``, ``--amplitude``,
``--noise``, ``--spots``). It writes ``resolution.md`` (the table and the command),
``resolution.json``, ``auc_vs_resolution.png`` and ``lesion_examples.png`` (what a lesion
looks like at each resolution) under ``--out`` (default ``results/resolution/``).

The task (``lesion_field.py``): positive images contain a few small "lesions", spots whose
only difference from the distractor spots of both classes is a fine zero-mean checkerboard
texture. Area downsampling averages the texture away (exactly, by construction), so the
ideal observer's AUC is about 1.0 at full resolution, about 0.71 at half and 0.5 at a
quarter; the table lists it beside the measured AUC.

The network is the same at every resolution: a streamed trunk of strided convolutions (no
BatchNorm) and a head of global max pooling (the evidence is sparse) and a linear layer. It
is trained with ``ls.StreamingStrategy`` at every resolution; at the top resolution the
tile size makes each image stream in several tiles, as an image too large for memory would.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC

import lightning_streaming as ls

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lesion_field.py beside this file
from lesion_field import FieldConfig, LesionFields, Spot, bayes_auc, downsample, generate, lesion_survives  # noqa: E402

log = logging.getLogger("resolution")


class ResolutionClassifier(ls.StreamingMixin, pl.LightningModule):
    """Streamed trunk of strided convolutions, head of global max pooling and one logit.

    The trunk's first convolution (4 x 4, stride 2) sees every input pixel, so fine texture
    can reach the later layers; its total stride is 16 and its receptive field 32 input
    pixels. Global max pooling makes the network indifferent to the input size.
    """

    def __init__(self, lr: float = 2e-3, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))
        self.val_auc = BinaryAUROC()

    def tile_transform(self, tile: Tensor) -> Tensor:
        # Per pixel, applied to each tile: centre the pink background near zero.
        return (tile - 0.7) / 0.15

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self(x)[:, 0], y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        # Probabilities, not logits: BinaryAUROC decides per update whether to apply a sigmoid.
        self.val_auc.update(torch.sigmoid(self(x)[:, 0]), y.long())
        self.log("val_auc", self.val_auc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def train_one(
    config: FieldConfig, factor: int, seed: int, args: argparse.Namespace
) -> dict[str, float | int | str]:
    """Train a fresh network on the fields downsampled by ``factor`` and return its row."""
    side = config.size // factor
    torch.manual_seed(seed)  # the same initial weights at every resolution
    model = ResolutionClassifier(lr=args.lr)
    train = DataLoader(
        LesionFields(config, args.train_images, seed=seed, factor=factor),
        batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    val = DataLoader(
        LesionFields(config, args.val_images, seed=args.val_seed, factor=factor), batch_size=args.batch_size
    )
    plan = ls.tile_plan(model.trunk, (args.batch_size, 3, side, side), args.tile)
    log.info("%d^2 (factor %d): %d tile(s), grid %s, largest input region %s", side, factor, len(plan), plan.grid,
             plan.largest_region)  # fmt: skip
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=args.tile),
        accelerator="cpu",
        max_epochs=args.epochs,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        deterministic=True,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")  # validated once, after fitting
        trainer.fit(model, train)
    seconds = time.perf_counter() - start
    train_loss = float(trainer.callback_metrics["train_loss"])  # validate() resets the metrics
    auc = float(trainer.validate(model, val, verbose=False)[0]["val_auc"])
    log.info("%d^2: validation AUC %.3f after %d epochs (%.0f s training)", side, auc, args.epochs, seconds)
    return {
        "seed": seed,
        "factor": factor,
        "side": side,
        "lesion_px": config.lesion_diameter / factor,
        "cell_px": config.cell / factor,
        "tiles": len(plan),
        "grid": "x".join(map(str, plan.grid)),
        "train_s": seconds,
        "train_loss": train_loss,
        "auc": auc,
        "bayes_auc": bayes_auc(config, factor),
    }


def markdown(rows: list[dict], args: argparse.Namespace, command: str, wall: float) -> str:
    """The results table (one line per resolution, mean over seeds) and how it was made."""
    lines = [
        "# Validation AUC vs input resolution (same field of view)",
        "",
        f"Command: `{command}`",
        "",
        f"Fields of {args.size}^2 px, {args.train_images} training and {args.val_images} validation images, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, tile size {args.tile}, "
        f"seeds {' '.join(map(str, args.seeds))}; total wall time {wall:.0f} s.",
        "",
        "| resolution | downsampling | px per lesion diameter | px per texture cell | tiles per image (grid) | "
        "train time | val AUC | ideal-observer AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for factor in args.factors:
        group = [r for r in rows if r["factor"] == factor]
        aucs = torch.tensor([r["auc"] for r in group])
        auc = f"{aucs.mean():.3f}" + (f" ± {aucs.std():.3f} (n={len(group)})" if len(group) > 1 else "")
        first = group[0]
        seconds = sum(r["train_s"] for r in group) / len(group)
        lines.append(
            f"| {first['side']}² | {factor}x | {first['lesion_px']:g} | {first['cell_px']:g} | "
            f"{first['tiles']} ({first['grid']}) | "
            f"{seconds:.0f} s | {auc} | {first['bayes_auc']:.3f} |"
        )
    lines += [
        "",
        "Ideal-observer AUC: the best any classifier can reach at that resolution, from the generator's "
        "construction (`lesion_field.bayes_auc`). Downsampling by a multiple of 4 removes the lesion texture "
        "exactly; by 2 it keeps the texture of a quarter of the lesions (those whose checkerboard phase is even "
        "along both axes). Train time excludes validation.",
        "",
        "![validation AUC vs resolution](auc_vs_resolution.png)",
        "",
        "![a lesion and a distractor at each resolution](lesion_examples.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """AUC (each seed, their mean and the ideal observer's) against input resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [args.size // f for f in args.factors]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.scatter(r["side"], r["auc"], color="tab:blue", alpha=0.4, s=18)
    means = [sum(r["auc"] for r in rows if r["factor"] == f) / len(args.seeds) for f in args.factors]
    ax.plot(sides, means, "o-", color="tab:blue", label="streamed CNN (val AUC)")
    ideal = [rows[[r["factor"] for r in rows].index(f)]["bayes_auc"] for f in args.factors]
    ax.plot(sides, ideal, "s--", color="grey", label="ideal observer")
    ax.axhline(0.5, color="black", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sides, [f"{s}²" for s in sides])
    ax.set_ylim(0.35, 1.02)
    ax.set_xlabel("input resolution (same field of view)")
    ax.set_ylabel("validation AUC")
    ax.set_title("Small high-frequency lesions need resolution")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(config: FieldConfig, factors: list[int], path: Path, seed: int = 10_000) -> None:
    """Crops around spots of validation images at each factor (same field of view): a lesion
    whose texture survives halving the resolution, one whose texture does not, a distractor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples: dict[str, tuple[Tensor, Spot]] = {}
    for index in range(1, 41, 2):  # positive images, until each kind of spot is found
        image, _, spots = generate(config, seed, index)
        for spot in spots:
            kept = "kept" if lesion_survives(spot, config, 2) else "lost"
            kind = f"lesion ({kept} at 2x)" if spot.lesion else "distractor"
            examples.setdefault(kind, (image, spot))
        if len(examples) == 3:
            break
    d = config.lesion_diameter
    size = (2.2 * len(factors), 2.3 * len(examples))
    fig, axes = plt.subplots(len(examples), len(factors), figsize=size, squeeze=False)
    for row, (kind, (image, spot)) in enumerate(sorted(examples.items())):
        for column, factor in enumerate(sorted(factors)):
            # A window of three spot diameters around the spot, clipped to the image.
            y0, x0 = max(spot.top - d, 0) // factor, max(spot.left - d, 0) // factor
            crop = downsample(image, factor)[:, y0 : y0 + 3 * d // factor, x0 : x0 + 3 * d // factor]
            ax = axes[row, column]
            ax.imshow(crop.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{kind}, {config.size // factor}²", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="full-resolution side in px (default 1024)")
    parser.add_argument("--factors", type=int, nargs="+", default=[4, 2, 1],
                        help="area-downsampling factors to train at (default 4 2 1: 256^2, 512^2, 1024^2)")
    parser.add_argument("--tile", type=int, default=512, help="streaming tile size in px, halo included (default 512)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per resolution (default 5)")
    parser.add_argument("--train-images", type=int, default=32, help="training images, even (default 32)")
    parser.add_argument("--val-images", type=int, default=128, help="validation images, even (default 128)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds: initial weights, data order and training fields (default 0)")
    parser.add_argument("--val-seed", type=int, default=10_000, help="seed of the validation fields (default 10000)")
    task = FieldConfig()
    parser.add_argument("--spots", type=int, default=task.spots, help=f"spots per image (default {task.spots})")
    parser.add_argument("--max-lesions", type=int, default=task.max_lesions,
                        help=f"a positive image has 1 to this many lesions (default {task.max_lesions})")
    parser.add_argument("--amplitude", type=float, default=task.amplitude,
                        help=f"lesion texture amplitude (default {task.amplitude})")
    parser.add_argument("--noise", type=float, default=task.noise, help=f"pixel noise std (default {task.noise})")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    parser.add_argument("--out", type=Path, default=Path("results/resolution"),
                        help="output folder (default results/resolution)")
    args = parser.parse_args(argv)
    if args.train_images % 2 or args.val_images % 2:
        parser.error("--train-images and --val-images must be even (balanced classes)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Train at every factor and seed, write the table, JSON and plot; return the rows."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    config = FieldConfig(
        size=args.size, spots=args.spots, max_lesions=args.max_lesions, amplitude=args.amplitude, noise=args.noise
    )
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    rows = [train_one(config, factor, seed, args) for seed in args.seeds for factor in args.factors]
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args, command, wall)
    (args.out / "resolution.md").write_text(table)
    record = {"args": vars(args) | {"out": str(args.out)}, "rows": rows}
    (args.out / "resolution.json").write_text(json.dumps(record, indent=1))
    plot(rows, args, args.out / "auc_vs_resolution.png")
    plot_examples(config, args.factors, args.out / "lesion_examples.png", seed=args.val_seed)
    print(table)
    return rows


if __name__ == "__main__":
    main()
