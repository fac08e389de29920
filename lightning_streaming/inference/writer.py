"""PredictionWriter: write predictions, heatmaps and overlays during ``trainer.predict``."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..data.dataset import SlideView
from ..lightning._compat import LightningTyped
from ..lightning.info import model_info
from .explain import check_heatmap_kinds
from .outputs import _names, _write_heatmaps, prepare_output_dir, write_summary
from .predict import prediction_from, predict_views
from .records import SlidePrediction

__all__ = ["PredictionWriter"]


class PredictionWriter(LightningTyped, lightning_base="callbacks.BasePredictionWriter"):
    """Write what ``trainer.predict`` predicts, as :func:`~lightning_streaming.write_predictions`
    does: per slide (or image) and heatmap a ``.npy``, an overlay ``.png`` and a ``.geojson``
    after each batch, and ``predictions.csv`` and ``predictions.json`` at the end (one pair
    per process under DDP: ``predictions-rank1.csv``, ...).

    It takes the outputs of :class:`~lightning_streaming.StreamingMixin`'s default
    ``predict_step`` (a dict with ``"slides"`` and ``"probabilities"`` or ``"values"``).
    Heatmaps are computed from the batch: a
    :class:`~lightning_streaming.SlideDataModule` predict batch knows each image's slide,
    so they cover the slide at ``heatmap_spacing``; plain image tensors get heatmaps on
    their own pixels. Each costs one more streamed forward of the batch (no graph), and
    saliency a tile-by-tile backward; the callback leaves ``inference_mode`` for them.

    Args:
        output_dir: the folder to write to (created; refused at once if not writable).
        heatmaps: any of ``"saliency"``, ``"cam"``, ``"attention"``; () for predictions only.
        heatmap_spacing: um per heatmap pixel (None: about 1024 px on the slide's long side).
        tile_size, saliency_tile_size, memory_budget: tile sizes of the heatmaps' passes
            (see :func:`~lightning_streaming.predict_slide`).
        opacity: of the overlays' strongest values.

    Example::

        writer = ls.PredictionWriter("predictions/", heatmaps=("saliency", "cam"))
        trainer = pl.Trainer(strategy="streaming", callbacks=[writer])
        trainer.predict(model, datamodule=ls.SlideDataModule(predict="slides.csv", spacing=2.0))
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        heatmaps: Sequence[str] = (),
        *,
        heatmap_spacing: float | None = None,
        tile_size: int | None = None,
        saliency_tile_size: int | None = None,
        memory_budget: int | str | None = None,
        opacity: float = 0.5,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = prepare_output_dir(output_dir)
        self.heatmaps = check_heatmap_kinds(heatmaps)
        if not 0 <= opacity <= 1:
            raise ValueError(f"opacity must be between 0 and 1, got {opacity!r}")
        self.heatmap_spacing, self.opacity = heatmap_spacing, opacity
        self.tile_size, self.saliency_tile_size = tile_size, saliency_tile_size
        self.memory_budget = memory_budget
        self.predictions: list[SlidePrediction] = []
        self._names: set[str] = set()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.predictions, self._names = [], set()

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, Mapping) or "slides" not in prediction:
            raise TypeError(
                "PredictionWriter writes the outputs of StreamingMixin's default predict_step (a dict with 'slides' "
                f"and 'probabilities' or 'values'); {type(pl_module).__name__}.predict_step returned a "
                f"{type(prediction).__name__}. Remove your predict_step override, or return that dict"
            )
        if self.heatmaps:
            predictions = self._heatmapped(pl_module, prediction, batch)
        else:
            predictions = _from_outputs(pl_module, prediction)
        names = _names([*self.predictions, *predictions])[len(self.predictions) :]
        for item, name in zip(predictions, names):
            _write_heatmaps(item, name, self.output_dir, self.opacity)
            item.heatmaps = {}  # written: the summary needs no arrays
            item.thumbnail = None
        self.predictions += predictions

    def _heatmapped(self, pl_module: Any, prediction: Mapping[str, Any], batch: Any) -> list[SlidePrediction]:
        images = getattr(batch, "images", batch[0] if isinstance(batch, (tuple, list)) else batch)
        views = getattr(batch, "slides", None)
        slides = None  # opened from the views' paths
        if views is None:  # plain images: heatmaps on their own pixels
            shape = tuple(int(n) for n in images.shape[2:])
            views = [SlideView(s, 1.0, None, ((0, shape[0]),), ((0, shape[1]),), (0, 0), shape, 0)
                     for s in prediction["slides"]]  # fmt: skip
            slides = [None] * len(views)
        with torch.inference_mode(False), torch.enable_grad():  # Trainer.predict runs in inference mode
            if isinstance(images, Tensor) and images.is_inference():
                images = images.clone()
            made = predict_views(
                pl_module, images, views, slides=slides, targets=_target_names(pl_module, prediction),
                heatmaps=self.heatmaps, heatmap_spacing=self.heatmap_spacing, tile_size=self.tile_size,
                saliency_tile_size=self.saliency_tile_size, memory_budget=self.memory_budget,
            )  # fmt: skip
        for item, slide in zip(made, prediction["slides"]):
            item.slide = slide
        return made

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        stem = "predictions" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}"
        write_summary(self.predictions, self.output_dir, stem)


def _target_names(model: Any, prediction: Mapping[str, Any]) -> list[str | None] | None:
    targets = prediction.get("targets")
    if targets is None:
        return None
    classes = model_info(model).classes or []
    names = []
    for target in targets.tolist() if isinstance(targets, Tensor) else list(targets):
        if isinstance(target, int) and 0 <= target < len(classes):
            names.append(classes[target])
        else:
            names.append(str(target))
    return names


def _from_outputs(model: Any, prediction: Mapping[str, Any]) -> list[SlidePrediction]:
    """SlidePredictions from the default predict_step's dict (no heatmaps)."""
    info = model_info(model)
    scores = prediction["values"] if "values" in prediction else prediction["probabilities"]
    targets = _target_names(model, prediction) or [None] * len(prediction["slides"])
    rows = zip(prediction["slides"], scores.tolist(), targets)
    return [prediction_from(info, slide, row, target) for slide, row, target in rows]
