"""What a prediction is: a slide's class (or value), the probabilities, and its heatmaps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Heatmap", "SlidePrediction"]


@dataclass
class Heatmap:
    """One heatmap over a whole slide.

    Attributes:
        values: ``(H, W)`` float32; 0 where nothing was computed (outside the tissue).
        spacing: um per heatmap pixel.
        kind: ``"saliency"``, ``"cam"`` or ``"attention"``.
        to_level0: level-0 slide pixels per heatmap pixel, ``(rows, cols)``: heatmap pixel
            ``(p, q)`` covers level-0 pixels from ``(p * to_level0[0], q * to_level0[1])``.
        target: the class (or regression target) the heatmap explains.

    Example::

        heatmap = prediction.heatmaps["saliency"]
        np.save("saliency.npy", heatmap.values)
    """

    values: np.ndarray
    spacing: float
    kind: str
    to_level0: tuple[float, float] = (1.0, 1.0)
    target: str | None = None

    def describe(self) -> dict[str, Any]:
        """Everything but the values, as plain data."""
        return {
            "kind": self.kind,
            "shape": list(self.values.shape),
            "spacing_um": self.spacing,
            "level0_pixels_per_pixel": list(self.to_level0),
            "target": self.target,
            "max": float(self.values.max()) if self.values.size else 0.0,
        }


@dataclass
class SlidePrediction:
    """A model's prediction for one slide (or image).

    Attributes:
        slide: the slide's path (or an image's identity).
        label: the predicted class (classification), the labels at or above 0.5 joined by
            ``"+"`` (multilabel), or the formatted value (regression).
        probabilities: per class (classification and multilabel); None for regression.
        value: the first regression output; None otherwise.
        heatmaps: by kind.
        task: ``"classification"``, ``"multilabel"`` or ``"regression"``.
        values: every regression output by target name; None otherwise.
        spacing: um per pixel the slide was read at.
        target: the manifest's target for this slide, when it has one.
        region: the analysed box at ``spacing`` ``((row0, row1), (col0, col1))`` (the tissue).
        size: the slide's ``(height, width)`` at ``spacing``.
        thumbnail: ``(h, w, 3)`` uint8 view of the slide for overlays (at ``thumbnail_spacing``).
        thumbnail_spacing: um per thumbnail pixel.
        seconds: wall time of the prediction.

    Example::

        prediction = ls.predict_slide(model, "slide.svs")
        print(prediction.label, prediction.probabilities)
    """

    slide: str
    label: str
    probabilities: dict[str, float] | None = None
    value: float | None = None
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)
    task: str = "classification"
    values: dict[str, float] | None = None
    spacing: float | None = None
    target: str | None = None
    region: tuple[tuple[int, int], tuple[int, int]] | None = None
    size: tuple[int, int] | None = None
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    thumbnail_spacing: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: everything but the arrays (heatmaps are described)."""
        return {
            "slide": self.slide,
            "label": self.label,
            "task": self.task,
            "probabilities": self.probabilities,
            "value": self.value,
            "values": self.values,
            "target": self.target,
            "spacing_um": self.spacing,
            "region": [list(r) for r in self.region] if self.region is not None else None,
            "size": list(self.size) if self.size is not None else None,
            "heatmaps": {kind: heatmap.describe() for kind, heatmap in self.heatmaps.items()},
            "seconds": self.seconds,
        }
