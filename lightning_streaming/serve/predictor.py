"""The service's prediction step: a thin adapter over the package's inference API
(``ls.load_model``, ``ls.model_info``, ``ls.predict_slide``, ``ls.write_prediction``,
``ls.render_overlay``). It runs inside a worker process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["StreamingPredictor", "describe_files"]

log = logging.getLogger(__name__)

_OVERLAY_OPACITY = 0.5
_PNG_COMPRESSION = 1  # zlib's fastest: the page's pictures are made per upload, and the default level costs seconds


class StreamingPredictor:
    """Loads a checkpoint once and predicts uploaded images with it.

    Args:
        checkpoint: the checkpoint file (loaded with ``weights_only=True`` by ``ls.load_model``).
        model: the model class, or ``"module:Class"``.
        heatmaps: heatmap kinds to compute (``ls.predict_slide``'s names).
    """

    def __init__(self, checkpoint: str, model: Any, heatmaps: Iterable[str] = ("cam", "saliency")) -> None:
        import lightning_streaming as ls

        self._ls = ls
        self.model = ls.load_model(checkpoint, model, map_location="cpu")
        self.heatmaps = tuple(heatmaps)
        self._info = ls.model_info(self.model)

    def info(self) -> dict[str, Any]:
        """What the home page says about the model."""
        info = self._info
        return {
            "classes": list(info.classes),
            "task": info.task,
            "spacing": info.spacing,
            "checkpoint": Path(info.checkpoint).name if info.checkpoint else None,
            "heatmaps": list(self.heatmaps),
        }

    def predict(
        self, path: Path, out_dir: Path, *, name: str, base_spacing: float | None, progress: Callable[[float], None]
    ) -> dict[str, Any]:
        """Predict ``path``, write every output into ``out_dir``, and say what was made.
        ``name`` is the file's name as its owner knows it (in titles and file names).

        Returns:
            ``label``, ``probabilities`` (or ``value``), ``files`` (download name -> file in
            ``out_dir``), ``layers``: the page's picture, ``{"heatmaps": {kind: {"base",
            "color", "overlay"}}}`` (file names: the image alone, the heatmap's colours alone,
            and both blended at half opacity).
        """
        ls = self._ls
        prediction = ls.predict_slide(
            self.model, str(path), heatmaps=self.heatmaps, base_spacing=base_spacing, progress=progress
        )
        prediction.slide = name  # not the stored copy's generated name
        written = ls.write_prediction(prediction, out_dir)
        files = {p.name: p.name for p in _paths(written, out_dir)}
        layers: dict[str, dict[str, str]] = {}
        for kind in prediction.heatmaps:
            names = {"base": f"layer_{kind}_base.png", "color": f"layer_{kind}_color.png",
                     "overlay": f"overlay_{kind}.png"}  # fmt: skip
            # The page blends the image and the heatmap's colours itself (opacity slider, toggle):
            # the overlay at opacity 0 and 1 are exactly those two layers.
            for layer, opacity in (("base", 0.0), ("color", 1.0), ("overlay", _OVERLAY_OPACITY)):
                picture = ls.render_overlay(prediction, heatmap=kind, opacity=opacity)
                picture.save(out_dir / names[layer], compress_level=_PNG_COMPRESSION)
            layers[kind] = names
        probabilities = getattr(prediction, "probabilities", None)
        value = getattr(prediction, "value", None)
        return {
            "label": None if prediction.label is None else str(prediction.label),
            "probabilities": None if probabilities is None else {str(k): float(v) for k, v in probabilities.items()},
            "value": None if value is None else float(value),
            "files": files,
            "layers": {"heatmaps": layers},
        }


def _paths(written: Any, out_dir: Path) -> list[Path]:
    """The files ``ls.write_prediction`` reports (a mapping or a sequence of paths), those
    inside ``out_dir`` only."""
    values = written.values() if isinstance(written, dict) else written
    found: list[Path] = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            path = Path(item).resolve()
            if path.parent == out_dir.resolve() and path.is_file():
                found.append(path)
    return found


_HEATMAP_NAMES = {"cam": "class activation", "saliency": "saliency", "attention": "attention"}


def describe_files(files: dict[str, str]) -> list[tuple[str, str]]:
    """``(download name, what it is)`` for the result page, in a reader's order."""
    order = {".csv": 0, ".json": 1, ".png": 2, ".npy": 3}
    kinds = {".png": "Overlay picture", ".csv": "Prediction, CSV", ".json": "Prediction, JSON",
             ".npy": "Heatmap values, NumPy", ".tif": "Heatmap for a slide viewer, TIFF",
             ".tiff": "Heatmap for a slide viewer, TIFF", ".geojson": "Regions for QuPath, GeoJSON"}  # fmt: skip
    rows = []
    for name in files:
        suffixes = [s.lstrip(".") for s in Path(name).suffixes]
        heatmap = next((_HEATMAP_NAMES[s] for s in suffixes[:-1] if s in _HEATMAP_NAMES), None)
        what = kinds.get(Path(name).suffix.lower(), "File")
        rows.append((name, f"{what} ({heatmap})" if heatmap else what))
    return sorted(rows, key=lambda row: (order.get(Path(row[0]).suffix.lower(), 9), row[0]))
