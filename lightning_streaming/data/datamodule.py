"""SlideDataModule: train/val/test slide manifests as a LightningDataModule (for either
Lightning package, see :mod:`lightning_streaming.lightning._compat`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch.utils.data import DataLoader

from ..lightning._compat import LightningTyped
from ..lightning.info import ModelInfo
from .augment import Augmentation
from .dataset import SlideDataset, collate_slides
from .manifest import Manifest, Task
from .policy import OnError, check_on_error
from .sampler import ClassBalancedSampler, EpochSampler
from .tissue import TissueDetection

__all__ = ["SlideDataModule"]

log = logging.getLogger(__name__)


class _ReportingLoader(DataLoader):
    """A DataLoader that reports, when an epoch's iteration ends, how many bad samples its
    dataset skipped (under ``on_error="skip"``)."""

    def __init__(self, *args: Any, stage: str = "train", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.dataset
        assert isinstance(dataset, SlideDataset)
        _report(dataset, self.stage, None)  # from an iteration cut short (limit_*_batches, an interruption)
        yield from super().__iter__()
        _report(dataset, self.stage, getattr(self.sampler, "epoch", dataset.epoch))


def _report(dataset: SlideDataset, stage: str, epoch: int | None) -> None:
    """Log the skipped count of a finished epoch (``epoch``), or of one that ended early (None)."""
    skipped = dataset.take_skipped()
    excluded = len(dataset.manifest.excluded)
    if skipped or (excluded and epoch is not None):
        when = f"in epoch {epoch}" if epoch is not None else "in an epoch that ended early"
        log.warning(
            "%s data (%s): %d bad sample(s) skipped and replaced %s, %d manifest row(s) left out; "
            "see the warnings above for which files and why",
            stage,
            dataset.manifest.path.name,
            skipped,
            when,
            excluded,
        )


class SlideDataModule(LightningTyped, lightning_base="LightningDataModule"):
    """Whole-slide training from CSV manifests (see :class:`Manifest` for the format), with
    one image per slide at ``spacing`` um/px, cropped to tissue and to ``input_size``.

    Sampling is DDP-safe: every DataLoader uses an :class:`EpochSampler` (PyTorch's
    ``DistributedSampler``, one share per process, reshuffled per epoch) or, with
    ``balanced=True``, a :class:`ClassBalancedSampler` (class-balanced draws, the same in
    every process, then shared out); Lightning calls ``set_epoch`` on them and leaves them
    in place. Augmentation is seeded by ``(seed, epoch, index)``.

    Images travel as uint8 (see :class:`SlideDataset`); with ``lazy=True`` as region
    sources, read tile by tile by the streamer (pair with a streaming strategy). Under
    ``on_error="skip"`` each bad sample is logged when met, and the number skipped is
    logged at each epoch end (per process).

    Args:
        train, val, test, predict: manifest paths (any may be None). The predict manifest
            may have no target column (just ``slide``); its batches are
            :class:`SlideBatch` ``(images, targets, slides)``, with each image's
            :class:`SlideView` (its slide and the pixels it shows).
        spacing: um per pixel.
        input_size: crop/pad size ``(height, width)`` or int; None: whole tissue images
            (batch_size 1).
        batch_size: samples per batch and process.
        num_workers, pin_memory, persistent_workers: as for ``DataLoader``.
        task: ``"classification"``, ``"multilabel"`` or ``"regression"``.
        target_columns, classes, num_classes: as for :meth:`Manifest.read` (the training
            manifest's classes are used for the others).
        balanced: class-balanced training sampling (classification only).
        samples_per_epoch: training draws per epoch with ``balanced`` (default: manifest size).
        augmentation: training augmentation (default :class:`Augmentation()`), or a dict of
            its fields.
        tissue: tissue detection settings (or a dict of :class:`TissueDetection`'s fields),
            or None for whole slides.
        remove_empty: remove empty rows and columns between tissue parts.
        lazy: images as lazy region sources.
        on_error: ``"raise"`` or ``"skip"``.
        seed: seed of shuffling and augmentation (the same in every process).
        cache_dir: where tissue masks are cached (None: in memory).

    Its hyperparameters (saved in checkpoints) are plain data: paths as strings, settings
    as dicts, so a checkpoint loads with ``torch.load``'s defaults (``weights_only=True``)
    and ``SlideDataModule.load_from_checkpoint`` rebuilds it.

    Example::

        data = ls.SlideDataModule(train="train.csv", val="val.csv", spacing=8.0, input_size=2048, balanced=True)
        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=1024, input_on_host=True))
        trainer.fit(model, datamodule=data)
    """

    def __init__(
        self,
        train: str | os.PathLike | None = None,
        val: str | os.PathLike | None = None,
        test: str | os.PathLike | None = None,
        predict: str | os.PathLike | None = None,
        *,
        spacing: float,
        input_size: int | Sequence[int] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        task: Task = "classification",
        target_columns: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        balanced: bool = False,
        samples_per_epoch: int | None = None,
        augmentation: Augmentation | Mapping[str, Any] | None = None,
        tissue: TissueDetection | Mapping[str, Any] | None = TissueDetection(),
        remove_empty: bool = False,
        lazy: bool = False,
        on_error: OnError = "raise",
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # Plain data only: a checkpoint must load with torch.load(path) (weights_only=True).
        self.save_hyperparameters({name: _plain(value, name) for name, value in arguments.items()})
        if isinstance(augmentation, Mapping):
            augmentation = Augmentation(**augmentation)
        if isinstance(tissue, Mapping):
            tissue = TissueDetection(**tissue)
        check_on_error(on_error)
        if balanced and task != "classification":
            raise ValueError(f"balanced=True needs task='classification' (class labels), got task={task!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if input_size is None and batch_size > 1:
            raise ValueError(
                "batch_size > 1 needs input_size: whole tissue images differ in size and cannot be batched"
            )
        self.manifests = {"train": train, "val": val, "test": test, "predict": predict}
        self.spacing = spacing
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.task: Task = task
        self.target_columns = target_columns
        self.classes = tuple(classes) if classes is not None else None
        self.num_classes_given = num_classes
        self.balanced = balanced
        self.samples_per_epoch = samples_per_epoch
        self.augmentation = augmentation
        self.tissue = tissue
        self.remove_empty = remove_empty
        self.lazy = lazy
        self.on_error: OnError = on_error
        self.seed = seed
        self.cache_dir = cache_dir
        self.datasets: dict[str, SlideDataset] = {}

    def _manifest(self, stage: str) -> Manifest:
        path = self.manifests[stage]
        assert path is not None
        return Manifest.read(
            path, task=self.task, target_columns=self.target_columns, classes=self.classes,
            num_classes=self.num_classes_given if self.classes is None else None, on_error=self.on_error,
            require_targets=stage != "predict",
        )  # fmt: skip

    def _model_classes(self) -> tuple[str, ...] | None:
        """The class names the attached model was trained with (its checkpoint's record)."""
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        info = getattr(model, "model_info", None)
        classes = getattr(info, "classes", None)
        return tuple(classes) if classes else None

    def _dataset(self, stage: str) -> SlideDataset:
        if stage not in self.datasets:
            if self.manifests[stage] is None:
                raise ValueError(f"SlideDataModule was given no {stage} manifest: pass {stage}='path/to/{stage}.csv'")
            if stage != "train" and self.classes is None and self.task == "classification":
                # Indices follow the training manifest, else the model's own classes (prediction only).
                self.classes = self._dataset("train").manifest.classes if self.manifests["train"] else (
                    self._model_classes()
                )
            self.datasets[stage] = SlideDataset(
                self._manifest(stage),
                self.spacing,
                self.input_size,
                train=stage == "train",
                augmentation=self.augmentation,
                tissue=self.tissue,
                remove_empty=self.remove_empty,
                lazy=self.lazy,
                on_error=self.on_error,
                seed=self.seed,
                cache_dir=self.cache_dir,
                with_slide=stage == "predict",
            )
            if stage == "train" and self.classes is None:
                self.classes = self.datasets[stage].manifest.classes
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        """Read and check the manifests the stage needs (bad rows raise or are skipped here)."""
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test", "predict"),
        }.get(stage, ())
        for name in wanted:
            if self.manifests[name] is not None:
                self._dataset(name)

    def model_info(self) -> ModelInfo:
        """What a model trained on this data should record for inference: class names (or
        regression target names), task and spacing (see :class:`~lightning_streaming.ModelInfo`)."""
        classes = self.classes
        if self.manifests["train"] is not None and (classes is None or self.task != "classification"):
            manifest = self._dataset("train").manifest
            classes = manifest.classes if self.task == "classification" else manifest.target_columns
        return ModelInfo(classes=list(classes) if classes else None, task=self.task, spacing=float(self.spacing))

    @property
    def num_classes(self) -> int | None:
        """Classes (or labels) of the training manifest; None for regression."""
        return self._dataset("train").manifest.num_classes

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, stage: str) -> DataLoader:
        dataset = self._dataset(stage)
        replicas, rank = self._world()
        if stage == "train" and self.balanced:
            sampler: EpochSampler | ClassBalancedSampler = ClassBalancedSampler(
                dataset.labels, self.samples_per_epoch, replicas, rank, seed=self.seed
            )
        else:
            sampler = EpochSampler(dataset, replicas, rank, shuffle=stage == "train", seed=self.seed)
        return _ReportingLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_slides,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and not self.lazy,
            persistent_workers=self.persistent_workers,
            drop_last=stage == "train" and self.batch_size > 1,
            stage=stage,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    @property
    def val_dataloader(self) -> Callable[[], DataLoader]:  # type: ignore[override]
        """The validation loader's hook. Without a val manifest it is Lightning's own
        (not overridden), so Lightning knows there is no validation data: it skips validation
        without warning that the model has no ``validation_step``."""
        if self.__dict__.get("manifests", {}).get("val") is None:
            return super().val_dataloader  # type: ignore[misc]
        return lambda: self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def teardown(self, stage: str) -> None:
        for name, dataset in self.datasets.items():
            _report(dataset, name, None)


def _plain(value: Any, name: str) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` reads and YAML writes: paths
    as strings, dataclasses (settings) as dicts, tuples as lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name), name) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    raise TypeError(f"SlideDataModule({name}=...) got a {type(value).__name__}; give plain values (see the docstring)")
