"""Train the Table II network twice from one initial state, conventionally and streamed, and
compare the runs step by step."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_streaming as ls

from .network import TableTwoNet
from .textures import TextureImages, TrainingCrops, TuningCells

__all__ = ["Settings", "RunResult", "Comparison", "four_tile_size", "train", "compare"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Settings:
    """One experiment's settings; the defaults run in a few CPU minutes.

    Args:
        size: input side in pixels (the paper: 320).
        tile: streaming tile side, halo included; None picks the smallest tile that
            splits the input into 2 x 2 tiles, the paper's "four tiles" (its 160 x 160
            tiles of a 320 x 320 image, which count no halo).
        epochs: training epochs (the paper: 300).
        batch_size: images per step (the paper: 4).
        lr: SGD learning rate (the paper: 1e-3).
        momentum: SGD momentum (the paper names none).
        dtype: "float32" (as the paper) or "float64".
        seed: seeds the initial weights, the data order and the crops.
        train_per_class: training images (cells) per class, at most 12.
        tune_per_class: tuning images (cells) per class, at most 4.
        threads: torch intra-op threads.
        reference: with float32, also train conventionally in float64 from the same
            state, to measure how far float32 rounding alone moves the loss curve.
        progress: show Lightning's progress bar.
    """

    size: int = 160
    tile: int | None = None
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-2
    momentum: float = 0.0
    dtype: str = "float32"
    seed: int = 0
    train_per_class: int = 12
    tune_per_class: int = 4
    threads: int = 1
    reference: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("size", "epochs", "batch_size", "train_per_class", "tune_per_class", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class RunResult:
    """One training run.

    Attributes:
        streamed: whether the trunk was streamed.
        step_losses: the training loss of every step, in order.
        step_epochs: the epoch of every step.
        tuning_losses, tuning_accuracies: on the tuning set after every epoch.
        state: the final parameters.
        seconds: wall time of ``fit``.
        trunk_regions: how often the trunk's first convolution ran on each spatial input
            size in training mode (forward and backward recomputation; tuning not counted).
    """

    streamed: bool
    step_losses: np.ndarray
    step_epochs: np.ndarray
    tuning_losses: list[float]
    tuning_accuracies: list[float]
    state: dict[str, Tensor]
    seconds: float
    trunk_regions: Counter = field(default_factory=Counter)


def four_tile_size(trunk: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The smallest tile side (halo included) whose plan for ``input_shape`` is a 2 x 2 grid."""
    side = input_shape[-1]
    for tile in range(side // 2, side + 1):
        try:
            if ls.tile_plan(trunk, input_shape, tile).grid == (2, 2):
                return tile
        except ls.TileTooSmallError:
            continue
    raise ValueError(f"no tile size splits a {side} x {side} input into 2 x 2 tiles for this trunk")


def _count_regions(counter: Counter) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if module.training:
            counter[tuple(inputs[0].shape[-2:])] += 1

    return hook


def train(
    settings: Settings,
    images: TextureImages,
    initial_state: dict[str, Tensor],
    tile: int | None,
    dtype: torch.dtype | None = None,
) -> RunResult:
    """Train :class:`TableTwoNet` from ``initial_state``: conventionally when ``tile`` is None
    (Lightning's default strategy), else with ``ls.StreamingStrategy(tile_size=tile)``; in
    ``dtype`` (default: the settings' dtype)."""
    dtype = dtype if dtype is not None else DTYPES[settings.dtype]
    model = TableTwoNet(images.classes, lr=settings.lr, momentum=settings.momentum)
    model.load_state_dict(initial_state)
    regions: Counter = Counter()
    model.trunk[0].register_forward_pre_hook(_count_regions(regions))
    training = TrainingCrops(images, settings.size, seed=settings.seed, dtype=dtype)
    # EpochSampler yields (index, epoch) keys and is reshuffled per epoch from the seed alone,
    # so both runs see the same crops in the same order.
    sampler = ls.EpochSampler(training, num_replicas=1, rank=0, shuffle=True, seed=settings.seed)
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=tile) if tile is not None else "auto",
        accelerator="cpu",
        devices=1,
        precision="64-true" if dtype == torch.float64 else "32-true",
        max_epochs=settings.epochs,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=settings.progress,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        start = time.perf_counter()
        trainer.fit(
            model,
            DataLoader(training, batch_size=settings.batch_size, sampler=sampler),
            DataLoader(TuningCells(images, settings.size, dtype=dtype), batch_size=settings.batch_size),
        )
        seconds = time.perf_counter() - start
    return RunResult(
        streamed=tile is not None,
        step_losses=np.array(model.step_losses),
        step_epochs=np.array(model.step_epochs),
        tuning_losses=list(model.tuning_losses),
        tuning_accuracies=list(model.tuning_accuracies),
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        seconds=seconds,
        trunk_regions=regions,
    )


@dataclass
class Comparison:
    """Both runs of one experiment, the tile plan the streamed one used, and (float32 with
    ``reference``) a conventional float64 run."""

    settings: Settings
    tile: int
    plan: ls.TilePlan
    conventional: RunResult
    streamed: RunResult
    initial: dict[str, Tensor]
    reference: RunResult | None = None

    @property
    def step_differences(self) -> np.ndarray:
        """|streamed - conventional| training loss, per step."""
        return np.abs(self.streamed.step_losses - self.conventional.step_losses)

    def epoch_rows(self) -> list[dict[str, float]]:
        """Per epoch: steps, mean loss each way, largest |difference| of step losses (also
        relative to the conventional loss), tuning loss and accuracy each way; with a
        reference run, the largest |float32 - float64| conventional step loss."""
        rows = []
        difference = self.step_differences
        rounding = self.rounding_differences
        for epoch in range(self.settings.epochs):
            steps = self.conventional.step_epochs == epoch
            conventional, streamed = self.conventional.step_losses[steps], self.streamed.step_losses[steps]
            rows.append(
                dict(
                    epoch=epoch + 1,
                    steps=int(steps.sum()),
                    loss_conventional=float(conventional.mean()),
                    loss_streamed=float(streamed.mean()),
                    max_difference=float(difference[steps].max()),
                    max_relative=float((difference[steps] / np.abs(conventional)).max()),
                    tuning_conventional=self.conventional.tuning_losses[epoch],
                    tuning_streamed=self.streamed.tuning_losses[epoch],
                    tuning_accuracy_conventional=self.conventional.tuning_accuracies[epoch],
                    tuning_accuracy_streamed=self.streamed.tuning_accuracies[epoch],
                    max_rounding=float(rounding[steps].max()) if rounding is not None else float("nan"),
                )
            )
        return rows

    @property
    def rounding_differences(self) -> np.ndarray | None:
        """|conventional - float64 conventional| training loss per step, if there is a reference."""
        if self.reference is None:
            return None
        return np.abs(self.conventional.step_losses - self.reference.step_losses)

    def parameter_difference(self) -> tuple[float, float]:
        """The largest |difference| of any final parameter, and the largest |parameter|."""
        worst = max(float((self.streamed.state[k] - v).abs().max()) for k, v in self.conventional.state.items())
        scale = max(float(v.abs().max()) for v in self.conventional.state.values())
        return worst, scale


def compare(settings: Settings, images: TextureImages) -> Comparison:
    """Run the experiment: one initial state (seeded), trained conventionally, then streamed
    (then, with float32 and ``settings.reference``, conventionally in float64). Sets torch's
    intra-op threads to ``settings.threads``.

    Raises:
        ValueError: when the tile covers the whole input (one tile): streaming would then
            run the trunk exactly as conventional training does, and prove nothing.
    """
    torch.set_num_threads(settings.threads)
    if settings.train_per_class > images.training.shape[1] or settings.tune_per_class > images.tuning.shape[1]:
        raise ValueError(
            f"train_per_class and tune_per_class may be at most {images.training.shape[1]} and "
            f"{images.tuning.shape[1]}, got {settings.train_per_class} and {settings.tune_per_class}"
        )
    images = copy.copy(images)
    images.training = images.training[:, : settings.train_per_class]
    images.tuning = images.tuning[:, : settings.tune_per_class]
    torch.manual_seed(settings.seed)
    model = TableTwoNet(images.classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (settings.batch_size, 3, settings.size, settings.size)
    tile = settings.tile if settings.tile is not None else four_tile_size(model.trunk, shape)
    plan = ls.tile_plan(model.trunk, shape, tile)
    if len(plan) < 2:
        raise ValueError(
            f"tile {tile} covers the whole {settings.size} x {settings.size} input in one tile: the streamed run would "
            "be the conventional one. Choose a smaller tile (or leave it unset for 2 x 2 tiles)"
        )
    log.info("tile plan: %s", plan)
    conventional = train(settings, images, initial, tile=None)
    log.info("conventional run: %.1f s", conventional.seconds)
    streamed = train(settings, images, initial, tile=tile)
    log.info("streamed run: %.1f s", streamed.seconds)
    reference = None
    if settings.reference and settings.dtype == "float32":
        reference = train(settings, images, initial, tile=None, dtype=torch.float64)
        log.info("float64 reference run: %.1f s", reference.seconds)
    return Comparison(settings, tile, plan, conventional, streamed, initial, reference)
