"""What a trained model needs for inference (class names, task, training spacing, the tile
normalisation), recorded in its checkpoint as plain data."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from torch import nn

__all__ = ["CHECKPOINT_KEY", "ModelInfo", "model_info", "transform_record"]

log = logging.getLogger(__name__)

#: The key of the record in a Lightning checkpoint (``torch.load(path)["lightning_streaming"]``).
CHECKPOINT_KEY = "lightning_streaming"
TASKS = ("classification", "multilabel", "regression")
Task = Literal["classification", "multilabel", "regression"]


@dataclass
class ModelInfo:
    """What inference needs to know about a model, beyond its weights.

    :class:`~lightning_streaming.StreamingMixin` models save it in their checkpoints (under
    ``"lightning_streaming"``, plain data that ``torch.load`` reads with ``weights_only=True``)
    and read it back on loading. Fields left None are filled in when the record is made:
    from the model's ``model_info`` attribute, else the Trainer's DataModule (a
    :class:`~lightning_streaming.SlideDataModule` knows classes, task and spacing), else the
    model's hyperparameters (``classes``, ``spacing``, ``mean``, ``std``).

    Attributes:
        classes: class names in the order of the model's outputs (classification,
            multilabel), or the names of the regression targets.
        task: ``"classification"`` (softmax over classes), ``"multilabel"`` (a sigmoid per
            class) or ``"regression"``.
        spacing: um per pixel of the images the model was trained on (None: unknown).
        checkpoint: the file the model was loaded from (set by
            :func:`~lightning_streaming.load_model`; never saved).
        mean, std: the per-channel normalisation of its ``tile_transform`` when that is a
            :class:`~lightning_streaming.Uint8Normalize` (in [0, 1] units).
        model_class: ``"module:QualifiedName"`` of the class that saved the checkpoint.

    Example::

        model.model_info = ls.ModelInfo(classes=["normal", "tumour"], spacing=2.0)
        trainer.save_checkpoint("model.ckpt")           # the record travels with the weights
        ls.model_info(ls.load_model("model.ckpt", Model)).classes   # ['normal', 'tumour']
    """

    classes: list[str] | None = None
    task: Task | None = None
    spacing: float | None = None
    checkpoint: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    model_class: str | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.spacing is not None:
            spacing = float(self.spacing)
            if not (math.isfinite(spacing) and spacing > 0):
                raise ValueError(f"spacing must be a positive number of um per pixel, got {self.spacing!r}")
            self.spacing = spacing

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (what a checkpoint holds); ``checkpoint`` is left out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _SAVED}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelInfo":
        """A record read back from a checkpoint (unknown keys, from a newer version, are ignored)."""
        return cls(**{k: v for k, v in record.items() if k in _SAVED})

    def merged(self, other: "ModelInfo") -> "ModelInfo":
        """This record with its None fields taken from ``other``."""
        values = {
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(other, f.name)
            for f in dataclasses.fields(self)
        }
        return ModelInfo(**values)


_SAVED = ("classes", "task", "spacing", "mean", "std", "model_class")


def transform_record(transform: Any) -> tuple[list[float] | None, list[float] | None]:
    """The ``(mean, std)`` of a :class:`~lightning_streaming.Uint8Normalize` tile transform;
    ``(None, None)`` for any other transform (it is the model's own code, rebuilt by it)."""
    from ..data.normalize import Uint8Normalize

    if isinstance(transform, Uint8Normalize):
        return list(transform.mean), list(transform.std)
    return None, None


def _from_hparams(model: nn.Module) -> ModelInfo:
    hparams = getattr(model, "hparams", None)
    if not isinstance(hparams, Mapping):
        return ModelInfo()
    classes = hparams.get("classes", hparams.get("class_names"))
    spacing = hparams.get("spacing")
    task = hparams.get("task") if hparams.get("task") in TASKS else None
    plain_list = lambda v: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else None  # noqa: E731
    return ModelInfo(
        classes=plain_list(classes),
        task=task,
        spacing=spacing if isinstance(spacing, (int, float)) and not isinstance(spacing, bool) else None,
        mean=plain_list(hparams.get("mean")),
        std=plain_list(hparams.get("std")),
    )


def _from_datamodule(model: nn.Module) -> ModelInfo:
    trainer = getattr(model, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    describe = getattr(datamodule, "model_info", None)
    if not callable(describe):
        return ModelInfo()
    try:
        info = describe()
    except Exception as error:  # noqa: BLE001 - a DataModule that cannot tell yet must not break saving
        log.debug("the DataModule could not describe the model's data: %s", error)
        return ModelInfo()
    return info if isinstance(info, ModelInfo) else ModelInfo()


def _output_count(head: nn.Module | None) -> int | None:
    """Outputs of the head's last Linear layer (or 1x1-style convolution), if it has one."""
    if head is None:
        return None
    last = None
    for module in head.modules():
        if isinstance(module, nn.Linear):
            last = module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            last = module.out_channels
    return last


def model_info(model: nn.Module) -> ModelInfo:
    """What ``model`` knows about its task: class names, task, training spacing, the checkpoint
    it came from and its tile normalisation, with every gap filled.

    Sources, first found wins per field: the model's ``model_info`` attribute (set by you, or
    read from its checkpoint), the DataModule of the Trainer it is attached to, its
    hyperparameters, its ``tile_transform``. Without class names the classes are named by
    index (``"0"``, ``"1"``, ...) from the size of the head's last Linear layer; the task
    defaults to ``"classification"``.

    Example::

        info = ls.model_info(model)
        print(info.classes, info.task, info.spacing)
    """
    own = getattr(model, "model_info", None)
    info = own if isinstance(own, ModelInfo) else ModelInfo()
    info = info.merged(_from_datamodule(model)).merged(_from_hparams(model))
    transform = model.streaming_transform() if hasattr(model, "streaming_transform") else None
    mean, std = transform_record(transform)
    if mean is not None:
        info.mean, info.std = mean, std
    if info.task is None:
        info.task = "classification"
    if info.model_class is None:
        info.model_class = f"{type(model).__module__}:{type(model).__qualname__}"
    if not info.classes:
        head = model.streaming_split()[1] if hasattr(model, "streaming_split") else None
        count = _output_count(head)
        info.classes = [str(i) for i in range(count)] if count is not None else []
    return info
