"""Write predictions for people and scripts: a CSV and a JSON of all slides, and per slide and
heatmap the raw values (.npy), an overlay picture (.png) and the high-scoring regions as
GeoJSON for a slide viewer."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .geojson import heatmap_features
from .overlay import analysed_pixels, render_overlay
from .records import SlidePrediction

__all__ = ["OutputError", "prepare_output_dir", "write_prediction", "write_predictions", "write_summary"]


class OutputError(OSError):
    """The output folder cannot be created or written to."""


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir``, created if needed and checked writable (a clear error if not)."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise OutputError(
            f"cannot write predictions to {str(path)!r}: {error.strerror or error}. Choose another output folder, "
            "or make this one writable"
        ) from error
    return path


def _names(predictions: Sequence[SlidePrediction]) -> list[str]:
    """A file-name stem per prediction: the slide's name, made unique."""
    names, seen = [], set()
    for prediction in predictions:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(prediction.slide).stem) or "slide"
        name, k = stem, 2
        while name in seen:
            name, k = f"{stem}-{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def _columns(predictions: Sequence[SlidePrediction]) -> list[str]:
    columns = ["slide", "label"]
    for prediction in predictions:
        for name in [*(prediction.probabilities or {}), *(prediction.values or {})]:
            column = f"p_{name}" if prediction.probabilities is not None else f"value_{name}"
            if column not in columns:
                columns.append(column)
    if any(p.target is not None for p in predictions):
        columns.append("target")
    return columns + ["spacing_um"]


def write_summary(predictions: Sequence[SlidePrediction], out_dir: Path, stem: str = "predictions") -> dict[str, Path]:
    """``<stem>.csv`` (one row per slide: label, per-class probabilities or values, target)
    and ``<stem>.json`` (everything but the arrays) in ``out_dir``."""
    columns = _columns(predictions)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for p in predictions:
            row = {"slide": p.slide, "label": p.label, "target": p.target, "spacing_um": p.spacing}
            row.update({f"p_{k}": f"{v:.6f}" for k, v in (p.probabilities or {}).items()})
            row.update({f"value_{k}": f"{v:.6g}" for k, v in (p.values or {}).items()})
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    json_path.write_text(json.dumps([p.to_dict() for p in predictions], indent=1), encoding="utf-8")
    return {"csv": csv_path, "json": json_path}


def _write_heatmaps(prediction: SlidePrediction, name: str, out_dir: Path, opacity: float) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for kind, heatmap in prediction.heatmaps.items():
        files = {suffix: out_dir / f"{name}.{kind}.{suffix}" for suffix in ("npy", "png", "geojson")}
        with open(files["npy"], "wb") as f:  # np.save(path) would append .npy to other names
            np.save(f, heatmap.values)
        render_overlay(prediction, kind, opacity).save(files["png"], format="PNG")
        features = heatmap_features(heatmap, analysed=analysed_pixels(prediction, heatmap))
        files["geojson"].write_text(json.dumps(features), encoding="utf-8")
        paths.update({f"{kind}.{suffix}": path for suffix, path in files.items()})
    return paths


def write_predictions(
    predictions: Iterable[SlidePrediction], out_dir: str | os.PathLike, *, opacity: float = 0.5
) -> list[dict[str, Path]]:
    """Write ``predictions.csv`` and ``predictions.json`` for all slides, and for each slide
    and heatmap kind ``<slide>.<kind>.npy`` (the values, float32, over the whole slide at the
    heatmap's spacing), ``<slide>.<kind>.png`` (:func:`render_overlay`) and
    ``<slide>.<kind>.geojson`` (regions in the upper half of the drawn range, in level-0
    pixel coordinates: QuPath's File > Import objects lays them over the slide).

    Returns, per prediction, its paths by key: ``"csv"``, ``"json"``, ``"<kind>.npy"``,
    ``"<kind>.png"``, ``"<kind>.geojson"``.

    Raises:
        OutputError: ``out_dir`` cannot be created or written to.

    Example::

        ls.write_predictions(ls.predict_slides(model, slides), "results/predictions")
    """
    predictions = list(predictions)
    path = prepare_output_dir(out_dir)
    try:
        summary = write_summary(predictions, path)
        return [
            {**summary, **_write_heatmaps(p, name, path, opacity)} for p, name in zip(predictions, _names(predictions))
        ]
    except OSError as error:
        raise OutputError(f"writing predictions to {str(path)!r} failed: {error}") from error


def write_prediction(
    prediction: SlidePrediction, out_dir: str | os.PathLike, *, opacity: float = 0.5
) -> dict[str, Path]:
    """:func:`write_predictions` for one slide: ``predictions.csv``, ``predictions.json`` and
    the heatmap files in ``out_dir``; returns their paths by key (``"csv"``, ``"json"``,
    ``"saliency.npy"``, ``"saliency.png"``, ``"saliency.geojson"``, ...).

    Example::

        paths = ls.write_prediction(prediction, "out/")
        print(paths["saliency.png"])
    """
    return write_predictions([prediction], out_dir, opacity=opacity)[0]
