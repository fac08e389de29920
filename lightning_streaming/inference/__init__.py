"""Using a trained model: loading it, whole-slide prediction, streamed saliency, class
activation maps and the head's location weights, writing and rendering the results, a
prediction writer for ``trainer.predict`` and the ``lightning-streaming predict`` command.

Names are imported on first use; nothing here imports Lightning except the prediction
writer (a Lightning callback, built for the Lightning package in use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .cam import LocationWeights, grad_cam
    from .checkpoint import CheckpointError, load_model
    from .explain import HEATMAP_KINDS
    from .geometry import HeatmapGrid, Pooler
    from .outputs import OutputError, write_prediction, write_predictions
    from .overlay import render_overlay
    from .predict import predict_slide, predict_slides, predict_views
    from .records import Heatmap, SlidePrediction
    from .saliency import streamed_saliency
    from .writer import PredictionWriter

_WHERE = {
    "LocationWeights": ".cam",
    "grad_cam": ".cam",
    "CheckpointError": ".checkpoint",
    "load_model": ".checkpoint",
    "HEATMAP_KINDS": ".explain",
    "HeatmapGrid": ".geometry",
    "Pooler": ".geometry",
    "OutputError": ".outputs",
    "write_prediction": ".outputs",
    "write_predictions": ".outputs",
    "render_overlay": ".overlay",
    "predict_slide": ".predict",
    "predict_slides": ".predict",
    "predict_views": ".predict",
    "Heatmap": ".records",
    "SlidePrediction": ".records",
    "streamed_saliency": ".saliency",
    "PredictionWriter": ".writer",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, lightning_typed=("PredictionWriter",))

__all__ = sorted(_WHERE)
