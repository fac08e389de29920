"""Slide-level training in the shape of the streaming paper's TUPAC16 and CAMELYON17
experiments: the model, the command line, the run, and its markdown table and plot.

Shared by ``camelyon_like.py`` (classification) and ``tupac_like.py`` (regression); see
their docstrings for what each runs. Everything here uses only the public API of
``lightning_streaming``.

What the paper fixes and this keeps as defaults: the Table III network (:mod:`paper_net`),
He initialisation, Adam with learning rate 1e-4 and the default betas, the learning rate
multiplied by 0.99 after every epoch, images normalised with the training set's per-channel
mean and std, the last seven layers un-streamed. The task scripts set what differs per task
(loss, metrics, dropout, BatchNorm or weight decay and LSUV).

"Frozen BatchNorm" (``--freeze-bn``) means: every BatchNorm layer stays in eval mode for
the whole run (it normalises with its running mean and variance, which are never
updated) and its affine weight and bias are not trained (``requires_grad=False``, left out
of the optimizer). It is then a fixed per-channel affine map: local, so it may even sit in
the streamed trunk (``--head-layers`` below 7). From a fresh initialisation a frozen
BatchNorm is almost the identity (running mean 0, variance 1, weight 1, bias 0); it is
meant for fine-tuning from trained weights (``--init-weights``), e.g. at a larger input
size or with mini-batches too small for batch statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

import lightning_streaming as ls
from paper_net import HEAD_LAYERS, extra_blocks_for, split_layers, table3_network

__all__ = [
    "SlideLevelModel",
    "TaskDefaults",
    "RunResult",
    "build_parser",
    "resolve_settings",
    "run",
    "write_results",
]

log = logging.getLogger("slide_level")

REPO = Path(__file__).resolve().parents[2]
Task = Literal["classification", "regression"]

# Sizes of a real run (the paper's 2048 x 2048 setting) and of --smoke (a CPU-sized run on
# the example slides). Only sizes shrink in smoke mode; the optimiser, loss and
# initialisation stay the paper's.
FULL_SIZES: dict[str, Any] = {
    "spacing": 8.0, "input_size": 2048, "width": 1.0, "epochs": 100, "batch_size": 16, "tile": "1024",
    "lsuv_batches": 10,
}  # fmt: skip
SMOKE_SIZES: dict[str, Any] = {
    "spacing": 2.0, "input_size": 320, "width": 0.125, "epochs": 3, "batch_size": 2, "tile": "224",
    "lsuv_batches": 3,
}  # fmt: skip


@dataclass(frozen=True)
class TaskDefaults:
    """What a task script fixes: the task, and the paper's per-task architecture choices.

    Attributes:
        name: the script's name (results go to ``results/<name>/``).
        task: ``"classification"`` or ``"regression"``.
        dropout: dropout before the fully connected layer (TUPAC16 0.5, CAMELYON17 none).
        batch_norm: BatchNorm in the last two blocks (TUPAC16) or none (CAMELYON17).
        weight_decay: Adam weight decay (CAMELYON17 1e-6).
        lsuv: streamed LSUV initialisation of the trunk (CAMELYON17).
        smoke_manifests: writes ``(train.csv, val.csv)`` from the example slides into a
            folder, for ``--smoke``.
        smoke_note: what the smoke data are and why its numbers mean nothing, written
            into the table and onto the plot.
    """

    name: str
    task: Task
    dropout: float
    batch_norm: bool
    weight_decay: float
    lsuv: bool
    smoke_manifests: Callable[[Path, ls.ExampleSlides], tuple[Path, Path]]
    smoke_note: str = ""


class SlideLevelModel(ls.StreamingMixin, pl.LightningModule):
    """The Table III network with its trunk streamed, trained on one label per slide.

    Classification: cross-entropy; validation AUROC per class, one class against the rest
    (as in the paper's Table VI), their mean, and accuracy. Regression: Huber loss with
    delta 1 (smooth L1 with beta 1); validation Spearman correlation. Adam (lr, default
    betas, weight decay), learning rate times ``lr_decay`` after every epoch.

    Per epoch, :attr:`history` gets a dict with the epoch, the learning rate used in it,
    the mean training loss and the validation metrics (all reduced across processes).

    Args:
        task: ``"classification"`` or ``"regression"``.
        num_outputs: classes, or regression targets.
        mean, std: the training set's per-channel statistics in [0, 1] units; images
            arrive as uint8 and each tile is normalised on its device.
        class_names: names of the classes (classification), for the metric names.
        width, extra_blocks, batch_norm, dropout: see :func:`paper_net.table3_network`.
        head_layers: paper layers left un-streamed (7 in the paper).
        freeze_bn: BatchNorm in eval mode with frozen statistics and affine parameters
            (see the module docstring).
        lr, weight_decay, lr_decay: Adam's learning rate and weight decay, and the
            per-epoch learning-rate factor.
    """

    def __init__(
        self,
        task: Task,
        num_outputs: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        class_names: Sequence[str] | None = None,
        width: float = 1.0,
        extra_blocks: int = 0,
        batch_norm: bool = True,
        dropout: float = 0.5,
        head_layers: int = HEAD_LAYERS,
        freeze_bn: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.save_hyperparameters()
        network = table3_network(
            num_outputs, width=width, extra_blocks=extra_blocks, batch_norm=batch_norm, dropout=dropout
        )
        self.trunk, self.head = split_layers(network, head_layers)
        self.tile_transform = ls.Uint8Normalize(mean, std)
        in_trunk = [name for name, m in self.trunk.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if in_trunk and not freeze_bn:
            raise ValueError(
                f"--head-layers {head_layers} puts BatchNorm layers {in_trunk} in the streamed trunk; training-mode "
                f"BatchNorm is not local and cannot be streamed: use --head-layers {HEAD_LAYERS} (the paper's split), "
                "--no-batch-norm, or --freeze-bn"
            )
        if freeze_bn:
            for bn in self._batch_norms():
                bn.weight.requires_grad_(False)
                bn.bias.requires_grad_(False)
            self.train(self.training)  # puts them in eval mode now, so the trunk is local from the start
        self.train_loss = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()
        if task == "classification":
            names = list(class_names) if class_names is not None else [str(i) for i in range(num_outputs)]
            if len(names) != num_outputs or num_outputs < 2:
                raise ValueError(f"classification needs >= 2 classes and one name each, got {num_outputs}, {names}")
            self.class_names = names
            self.loss_fn: nn.Module = nn.CrossEntropyLoss()
            # average=None: one AUROC per class, that class against the rest (Table VI)
            self.val_auroc = torchmetrics.classification.MulticlassAUROC(num_classes=num_outputs, average=None)
            self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=num_outputs, average="micro")
        else:
            self.loss_fn = nn.SmoothL1Loss(beta=1.0)  # Huber loss with delta 1
            with warnings.catch_warnings():  # "saves all targets": a validation set of slides is small
                warnings.filterwarnings("ignore", ".*will save all targets and predictions.*")
                self.val_spearman = torchmetrics.SpearmanCorrCoef(num_outputs=num_outputs)
        self.history: list[dict[str, float]] = []
        self._val_results: dict[str, float] = {}
        self._epoch_lr = math.nan

    # --- frozen BatchNorm ---------------------------------------------------------------
    def _batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "SlideLevelModel":
        """As ``nn.Module.train``, but frozen BatchNorm layers stay in eval mode (Lightning
        calls ``train()`` at the start of fit and after every validation)."""
        super().train(mode)
        if self.hparams.get("freeze_bn"):
            for bn in self._batch_norms():
                bn.eval()
        return self

    # --- steps --------------------------------------------------------------------------
    def _loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.hparams.task == "regression":
            target = target.to(output.dtype).view_as(output)
        return self.loss_fn(output, target)

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self._loss(self(images), targets)
        self.train_loss.update(loss.detach(), weight=len(targets))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> None:
        images, targets = batch
        output = self(images).float()
        self.val_loss.update(self._loss(output, targets), weight=len(targets))
        if self.hparams.task == "classification":
            probabilities = output.softmax(dim=1)
            self.val_auroc.update(probabilities, targets)
            self.val_accuracy.update(probabilities, targets)
        else:
            targets = targets.to(output.dtype).view_as(output)
            if output.shape[1] == 1:  # SpearmanCorrCoef wants (N,) for one output
                output, targets = output[:, 0], targets[:, 0]
            self.val_spearman.update(output, targets)

    def on_validation_epoch_end(self) -> None:
        results = {"val/loss": float(self.val_loss.compute())}
        if self.hparams.task == "classification":
            per_class = self.val_auroc.compute()
            for name, value in zip(self.class_names, per_class.tolist()):
                results[f"val/auroc_{name}"] = value
            results["val/auroc"] = float(per_class.mean())
            results["val/accuracy"] = float(self.val_accuracy.compute())
            self.val_auroc.reset()
            self.val_accuracy.reset()
        else:
            rho = self.val_spearman.compute()
            for i, value in enumerate(rho.flatten().tolist()):
                if rho.numel() > 1:
                    results[f"val/spearman_{i}"] = value
            results["val/spearman"] = float(rho.mean())
            self.val_spearman.reset()
        self.val_loss.reset()
        self.log_dict(results)  # already reduced across processes by the metrics
        if not self.trainer.sanity_checking:
            self._val_results = results

    def on_train_epoch_start(self) -> None:
        # Lightning steps epoch-interval schedulers right after an epoch's last batch (before
        # validation and on_train_epoch_end), so the epoch's own rate is read here.
        self._epoch_lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("lr", self._epoch_lr)

    def on_train_epoch_end(self) -> None:
        lr = self._epoch_lr
        entry = {"epoch": float(self.current_epoch), "lr": lr, "train/loss": float(self.train_loss.compute())}
        self.train_loss.reset()
        entry.update(self._val_results)  # this epoch's validation ran before this hook (if it ran)
        self._val_results = {}
        self.history.append(entry)

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = [p for p in self.parameters() if p.requires_grad]  # frozen BatchNorm is left out
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# --- command line -------------------------------------------------------------------------
def _sized(key: str) -> str:
    """Help text for a size option: its full and smoke defaults."""
    return f"(default {FULL_SIZES[key]}, smoke {SMOKE_SIZES[key]})"


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def build_parser(defaults: TaskDefaults, description: str) -> argparse.ArgumentParser:
    """The shared command line; the task's defaults decide dropout, BatchNorm, weight decay
    and LSUV. Size options default to None and are resolved by :func:`resolve_settings`."""
    p = argparse.ArgumentParser(prog=f"{defaults.name}.py", description=description)
    on = argparse.BooleanOptionalAction
    data = p.add_argument_group("data")
    data.add_argument("--train", type=Path, help="training manifest CSV (slide,<target columns>); none: --smoke")
    data.add_argument("--val", type=Path, help="validation (tuning) manifest CSV")
    data.add_argument("--target-columns", nargs="+", help="target columns (default: all but slide, base_spacing, "
                      "tissue_mask)")  # fmt: skip
    data.add_argument("--smoke", action="store_true", help="small sizes on the example slides (the default "
                      "without --train)")  # fmt: skip
    data.add_argument("--spacing", type=float, help=f"um/px {_sized('spacing')}")
    data.add_argument("--input-size", type=int, help=f"crop/pad size in px {_sized('input_size')}")
    data.add_argument("--batch-size", type=int, help=f"per process {_sized('batch_size')}")
    data.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps (default 1)")
    data.add_argument("--lazy", action=on, default=True, help="stream slides region by region (default on)")
    data.add_argument("--balanced", action="store_true", help="class-balanced training sampling (classification)")
    data.add_argument("--augment", action=on, default=True, help="flips, rotations, colour jitter (default on)")
    data.add_argument("--mean", type=float, nargs=3, help="training-set channel mean in [0, 1] (default: computed)")
    data.add_argument("--std", type=float, nargs=3, help="training-set channel std in [0, 1] (default: computed)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    data.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad slides: raise or skip")
    net = p.add_argument_group("network (Table III)")
    net.add_argument("--width", type=float, help=f"channel multiplier {_sized('width')}")
    net.add_argument("--extra-blocks", default="0", help="repeats of the 512-channel block, or 'auto': one per "
                     "doubling of the input beyond 2048 px (default 0)")  # fmt: skip
    net.add_argument("--head-layers", type=int, default=HEAD_LAYERS,
                     help=f"final paper layers not streamed (default {HEAD_LAYERS}, as in the paper)")  # fmt: skip
    net.add_argument("--dropout", type=float, default=defaults.dropout, help=f"before the FC layer "
                     f"(default {defaults.dropout})")  # fmt: skip
    net.add_argument("--batch-norm", action=on, default=defaults.batch_norm,
                     help=f"BatchNorm in the last two blocks (default {_on_off(defaults.batch_norm)})")  # fmt: skip
    net.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode, statistics and affine frozen")
    net.add_argument("--init-weights", type=Path, help="start from this checkpoint's weights (a run of this script)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=_sized("epochs"))
    opt.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    opt.add_argument("--lr-decay", type=float, default=0.99, help="learning-rate factor per epoch (default 0.99)")
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                     help=f"Adam weight decay (default {defaults.weight_decay:g})")  # fmt: skip
    opt.add_argument("--lsuv", action=on, default=defaults.lsuv,
                     help=f"streamed LSUV initialisation of the trunk (default {_on_off(defaults.lsuv)})")  # fmt: skip
    opt.add_argument("--lsuv-batches", type=int, help=f"mini-batches for LSUV {_sized('lsuv_batches')}")
    opt.add_argument("--lsuv-orthogonal", action="store_true", help="orthonormal weights before LSUV")
    opt.add_argument("--seed", type=int, default=0)
    hw = p.add_argument_group("hardware")
    hw.add_argument("--tile", help=f"streaming tile size in px, or 'auto' {_sized('tile')}")
    hw.add_argument("--memory-budget", default="8GiB", help="per-tile memory for --tile auto (default 8GiB)")
    hw.add_argument("--conventional", action="store_true", help="run the trunk conventionally (no streaming)")
    hw.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (default auto)")
    hw.add_argument("--devices", type=int, default=1, help="processes; > 1 uses the streaming_ddp strategy")
    hw.add_argument("--precision", default="32-true", help="e.g. 32-true; on a GPU 16-mixed or bf16-mixed (on a "
                    "CPU bf16 is usually much slower than 32-true)")  # fmt: skip
    hw.add_argument("--threads", type=int, default=2, help="torch intra-op threads per process (default 2)")
    hw.add_argument("--progress", action=on, default=True, help="Lightning's progress bar (default on)")
    hw.add_argument("--results", type=Path, help=f"output folder (default results/{defaults.name}/)")
    return p


def resolve_settings(args: argparse.Namespace, defaults: TaskDefaults) -> argparse.Namespace:
    """Fill in the size options: given values win, else the smoke or the full sizes.
    Smoke mode is on with ``--smoke`` or when no ``--train`` manifest is given."""
    args.smoke = bool(args.smoke or args.train is None)
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val is not None and args.train is None:
        raise SystemExit("--val needs --train")
    if args.extra_blocks == "auto":
        args.extra_blocks = extra_blocks_for(args.input_size)
    else:
        args.extra_blocks = int(args.extra_blocks)
    if args.tile != "auto":
        args.tile = int(args.tile)
    if args.balanced and defaults.task != "classification":
        raise SystemExit("--balanced needs class labels (classification)")
    if (args.mean is None) != (args.std is None):
        raise SystemExit("give both --mean and --std, or neither (then they are computed on the training set)")
    if args.conventional and args.lazy:
        # Lazy region sources are read by the streamer; a conventional trunk needs tensors.
        log.info("--conventional: crops are read into uint8 tensors (--no-lazy)")
        args.lazy = False
    if args.results is None:
        args.results = REPO / "results" / defaults.name
    return args


# --- the run --------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run produced (on rank zero; other processes get the same minus the files)."""

    history: list[dict[str, float]]
    table: Path | None
    plot: Path | None
    best_checkpoint: str
    best_score: float | None
    seconds: float
    tiles: str
    model: SlideLevelModel
    trainer: pl.Trainer
    lsuv_report: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # what the run's data are, for reading its numbers (smoke mode)


def _training_statistics(manifest: ls.Manifest, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """The paper normalises with the whole training set's mean and std: here over every
    pixel of each training row's un-augmented tissue image at the training spacing."""
    if args.mean is not None:
        return list(args.mean), list(args.std)
    dataset = ls.SlideDataset(
        manifest, args.spacing, train=False, lazy=True, on_error=args.on_error, cache_dir=args.results / "masks"
    )
    mean, std = ls.channel_mean_std(dataset)
    log.info("training-set mean %s, std %s (pass --mean/--std to skip this pass)",
             [round(m, 4) for m in mean], [round(s, 4) for s in std])  # fmt: skip
    return mean, std


def _strategy(args: argparse.Namespace) -> Any:
    tile = args.tile
    budget = args.memory_budget if tile == "auto" else None
    if args.conventional:
        return "ddp" if args.devices > 1 else "auto"
    if args.devices > 1:
        return ls.StreamingDDPStrategy(tile_size=tile, memory_budget=budget, input_on_host=True)
    return ls.StreamingStrategy(tile_size=tile, memory_budget=budget, input_on_host=True)


def _describe_tiles(model: SlideLevelModel, args: argparse.Namespace) -> str:
    if args.conventional:
        return "not streamed (--conventional)"
    if args.tile == "auto":
        return f"auto (memory budget {args.memory_budget})"
    shape = (args.batch_size, 3, args.input_size, args.input_size)
    plan = ls.tile_plan(model.trunk, shape, args.tile)
    grid = " x ".join(map(str, plan.grid))
    return (
        f"{len(plan)} tiles ({grid}) of at most {args.tile} px per {args.input_size} px image, largest input "
        f"region {plan.largest_region}; trunk output {plan.output_shape}"
    )


def run(
    args: argparse.Namespace, defaults: TaskDefaults, callbacks: Sequence[pl.Callback] = ()
) -> RunResult:
    """Train and validate as ``args`` say, then write the table and plot (rank zero).
    ``callbacks`` are added to the Trainer's (after the checkpoint and LSUV callbacks).

    Raises:
        SystemExit: for inconsistent options.
    """
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    args.results.mkdir(parents=True, exist_ok=True)
    task = defaults.task
    if args.smoke and args.train is None:
        slides = ls.example_slides(REPO / ".data")
        args.train, args.val = defaults.smoke_manifests(args.results / "smoke_data", slides)
        log.info("smoke mode: manifests %s and %s made from the example slides", args.train, args.val)

    data = ls.SlideDataModule(
        train=args.train, val=args.val, spacing=args.spacing, input_size=args.input_size, batch_size=args.batch_size,
        num_workers=args.num_workers, task=task, target_columns=args.target_columns, balanced=args.balanced,
        augmentation=ls.Augmentation() if args.augment else ls.Augmentation(
            flips=False, rotations=False, brightness=0, contrast=0, saturation=0, hue=0),
        lazy=args.lazy, on_error=args.on_error, seed=args.seed, cache_dir=args.results / "masks",
    )  # fmt: skip
    data.setup("fit")
    manifest = data.datasets["train"].manifest
    mean, std = _training_statistics(manifest, args)
    if task == "classification":
        num_outputs = manifest.num_classes or 0
        class_names = list(manifest.classes) if manifest.classes else [str(i) for i in range(num_outputs)]
    else:
        num_outputs, class_names = len(manifest.target_columns), None
    model = SlideLevelModel(
        task, num_outputs, mean, std, class_names=class_names, width=args.width, extra_blocks=args.extra_blocks,
        batch_norm=args.batch_norm, dropout=args.dropout, head_layers=args.head_layers, freeze_bn=args.freeze_bn,
        lr=args.lr, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
    )  # fmt: skip
    if args.init_weights is not None:
        state = torch.load(args.init_weights, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state)
        log.info("weights from %s", args.init_weights)
    tiles = _describe_tiles(model, args)
    log.info("network: %d paper layers (%d streamed, %d in the head), %s", len(model.trunk) + len(model.head),
             len(model.trunk), len(model.head), tiles)  # fmt: skip

    monitor = "val/auroc" if task == "classification" else "val/spearman"
    extra_callbacks, callbacks = list(callbacks), []
    checkpoint = None
    if args.val is not None:
        checkpoint = ModelCheckpoint(
            dirpath=args.results / "checkpoints", filename="best-epoch{epoch}", monitor=monitor, mode="max",
            save_top_k=1, auto_insert_metric_name=False,
        )  # fmt: skip
        callbacks.append(checkpoint)
    lsuv = None
    if args.lsuv:
        lsuv = ls.StreamingLSUV(num_batches=args.lsuv_batches, orthogonal_init=args.lsuv_orthogonal)
        callbacks.append(lsuv)
    callbacks += extra_callbacks
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices, strategy=_strategy(args),
        precision=args.precision, accumulate_grad_batches=args.accumulate, callbacks=callbacks,
        logger=CSVLogger(args.results, name="logs"), log_every_n_steps=1, enable_progress_bar=args.progress,
        enable_model_summary=False, num_sanity_val_steps=0 if args.smoke else 2, deterministic=False,
    )  # fmt: skip
    if args.freeze_bn:
        log.info("--freeze-bn: Lightning's warning about modules in eval mode refers to the frozen BatchNorm layers")
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    best_score = None
    if checkpoint is not None and checkpoint.best_model_score is not None:
        best_score = float(checkpoint.best_model_score)
    settings = {
        "task": task, "smoke": args.smoke, "train": str(args.train), "val": str(args.val), "spacing": args.spacing,
        "input_size": args.input_size, "batch_size": args.batch_size, "accumulate": args.accumulate,
        "width": args.width, "extra_blocks": args.extra_blocks, "layers": len(model.trunk) + len(model.head),
        "head_layers": args.head_layers, "dropout": args.dropout, "batch_norm": args.batch_norm,
        "freeze_bn": args.freeze_bn, "lr": args.lr, "lr_decay": args.lr_decay, "weight_decay": args.weight_decay,
        "lsuv": args.lsuv, "lsuv_batches": args.lsuv_batches if args.lsuv else None, "epochs": args.epochs,
        "lazy": args.lazy, "tile": args.tile, "devices": args.devices, "precision": args.precision,
        "mean": [round(m, 4) for m in mean], "std": [round(s, 4) for s in std], "seed": args.seed,
    }  # fmt: skip
    result = RunResult(
        history=model.history, table=None, plot=None,
        best_checkpoint=checkpoint.best_model_path if checkpoint is not None else "", best_score=best_score,
        seconds=seconds, tiles=tiles, model=model, trainer=trainer, lsuv_report=list(lsuv.report) if lsuv else [],
        settings=settings, note=defaults.smoke_note if args.smoke else "",
    )  # fmt: skip
    if trainer.is_global_zero:
        result.table, result.plot = write_results(result, args.results, defaults.name, monitor)
    return result


# --- results ------------------------------------------------------------------------------
def main_for(
    defaults: TaskDefaults, description: str, argv: list[str] | None = None, callbacks: Sequence[pl.Callback] = ()
) -> RunResult:
    """A script's ``main``: parse ``argv`` (default: the command line) with ``defaults``, train
    with ``callbacks`` added to the Trainer's, and write the results."""
    parser = build_parser(defaults, description)
    return run(resolve_settings(parser.parse_args(argv), defaults), defaults, callbacks)


def _fmt(value: Any, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key == "lr":
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


@rank_zero_only
def _log_table(text: str) -> None:
    log.info("\n%s", text)


def write_results(result: RunResult, folder: Path, name: str, monitor: str) -> tuple[Path, Path]:
    """Write ``<name>.md`` (settings, per-epoch table, LSUV table) and ``<name>.png``
    (training and validation loss, and the validation metrics, per epoch) into ``folder``."""
    history = result.history
    keys = ["lr", "train/loss"] + sorted({k for entry in history for k in entry if k.startswith("val/")},
                                         key=lambda k: (k != "val/loss", k != monitor, k))  # fmt: skip
    lines = [f"# {name}", ""]
    smoke_note = ""
    if result.settings.get("smoke"):
        smoke_note = result.note or (
            "Smoke mode: a few rows made from the example slides, tiny sizes. It shows the pipeline runs end to end; "
            "the numbers say nothing about accuracy."
        )
        lines += [smoke_note, ""]
    lines += [f"- wall time: {result.seconds:.1f} s for {len(history)} epoch(s)", f"- streaming: {result.tiles}"]
    if result.best_checkpoint:
        best = Path(result.best_checkpoint)
        shown = best.relative_to(REPO) if best.is_relative_to(REPO) else best
        lines.append(f"- best {monitor}: {_fmt(result.best_score)} ({shown})")
    lines.append(f"- settings: `{json.dumps(result.settings)}`")
    lines += ["", "| epoch | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for entry in history:
        lines.append(f"| {int(entry['epoch'])} | " + " | ".join(_fmt(entry.get(k), k) for k in keys) + " |")
    if result.lsuv_report:
        lines += ["", "StreamingLSUV (per-channel std of each trunk convolution's output, channel mean):", "",
                  "| layer | std before | std after | rescalings |", "|---|---|---|---|"]  # fmt: skip
        for row in result.lsuv_report:
            lines.append(f"| {row['layer']} | {row['std_before']:.4g} | {row['std_after']:.4f} | {row['iterations']} |")
    text = "\n".join(lines) + "\n"
    table = folder / f"{name}.md"
    table.write_text(text)
    _log_table(text)

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(e["epoch"]) for e in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train/loss", "training loss"), ("val/loss", "validation loss")):
        points = [(ep, e[key]) for ep, e in zip(epochs, history) if key in e]
        if points:
            left.plot(*zip(*points), marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key in [k for k in keys if k.startswith("val/") and k != "val/loss"]:
        points = [(ep, e[key]) for ep, e in zip(epochs, history) if key in e and math.isfinite(e[key])]
        if points:
            right.plot(*zip(*points), marker="o", label=key[len("val/"):], linewidth=2.5 if key == monitor else 1)
    right.set_xlabel("epoch")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("validation metric")
    if right.lines:
        right.legend()
    fig.suptitle(f"{name}{' (smoke mode: pipeline check, not accuracy)' if smoke_note else ''}")
    if smoke_note:  # say on the picture why it looks as it does
        import textwrap

        fig.text(0.5, 0.01, textwrap.fill(smoke_note, 150), ha="center", va="bottom", fontsize=8, style="italic")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    else:
        fig.tight_layout()
    plot = folder / f"{name}.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return table, plot


def setup_logging() -> None:
    """INFO for this example and StreamingLSUV's table, warnings from everything else."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("slide_level").setLevel(logging.INFO)
    logging.getLogger("lightning_streaming").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # inside Lightning 2.6 with torch 2.13: not ours to fix
