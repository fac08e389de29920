"""Whole-slide prediction: a slide (or a list of them) read lazily at a spacing, tissue only,
streamed through a trained model, with heatmaps."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core import RegionSource
from ..data.dataset import SlideView
from ..data.errors import MissingSpacingError, SpacingError
from ..data.layout import Layout
from ..data.slide import Slide
from ..data.source import SlideRegionSource
from ..data.tissue import TissueDetection
from ..lightning.info import ModelInfo, model_info
from ..lightning.auto_tile import auto_tile_size, parse_bytes
from ..lightning.settings import TileSize
from .explain import check_heatmap_kinds, explain
from .geometry import HeatmapGrid, Pooler, Pooling
from .records import Heatmap, SlidePrediction
from .tiles import default_memory_budget

__all__ = ["predict_slide", "predict_slides", "predict_views"]

log = logging.getLogger(__name__)

#: Without ``heatmap_spacing``, heatmaps have about this many pixels on the slide's long side.
DEFAULT_HEATMAP_SIDE = 1024


def _level0_per_pixel(slide: Slide, spacing: float) -> tuple[float, float]:
    """Level-0 pixels per pixel at ``spacing`` (rows, cols), as :meth:`Slide.read` maps them."""
    choice = slide.choose(spacing)
    (h0, w0), (h, w) = slide.level_dimensions[0], slide.level_dimensions[choice.level]
    return choice.ratio[0] * h0 / h, choice.ratio[1] * w0 / w


def open_slide(source: str | os.PathLike | Slide, assumed_spacing: float | None) -> Slide:
    """``source`` as a :class:`Slide`; one that records no pixel size is read at
    ``assumed_spacing`` um/px at full size (or refused, naming the fix, without one)."""
    slide = source if isinstance(source, Slide) else Slide(source)
    if slide.base_spacing is not None:
        return slide
    if assumed_spacing is None:
        raise MissingSpacingError(
            f"{str(slide.path)!r} records no pixel size and the model records no training spacing, so the image's "
            "scale is unknown: pass base_spacing= (um per pixel of the image; --base-spacing on the command line)",
            slide.path,
        )
    log.info("%s records no pixel size: taking it as %g um/px", slide.path, assumed_spacing)
    return Slide(slide.path, base_spacing=assumed_spacing, tolerance=slide.tolerance)


def _check_spacing(slide: Slide, spacing: float, info: ModelInfo) -> None:
    try:
        slide.choose(spacing)
    except SpacingError as error:
        trained = f" The model was trained at {info.spacing:g} um/px." if info.spacing is not None else ""
        raise SpacingError(f"{error}.{trained}", slide.path) from None


def _default_heatmap_spacing(size: tuple[int, int], spacing: float) -> float:
    return max(spacing, max(size) * spacing / DEFAULT_HEATMAP_SIDE)


def inference_budget(model: nn.Module, memory_budget: int | str | None) -> int:
    """``memory_budget`` in bytes; by default a quarter of the memory available on the
    trunk's device (:func:`default_memory_budget`)."""
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    parameter = next(iter(model.streaming_split()[0].parameters()), None)  # type: ignore[operator]
    return default_memory_budget(parameter.device if parameter is not None else torch.device("cpu"))


def saliency_tile_size_for(
    model: nn.Module, shape: Sequence[int], tile_size: TileSize | None, saliency_tile_size: TileSize | None,
    budget: int,
) -> TileSize:
    """The saliency pass's tile for an input of ``shape``: ``saliency_tile_size``, else
    ``tile_size``, else :func:`~lightning_streaming.auto_tile_size`'s for half of ``budget``
    bytes (the pass keeps one tile's graph; reading the region and reducing its gradient
    hold about as much again).

    The forward needs no such rule: without ``tile_size`` the core's planner chooses its
    tiles within the budget (a forward without a graph, whose tiles can be far larger than
    a training step's; for a plain ``Sequential`` trunk it may stream only the first
    children and run the rest whole on their small output)."""
    if saliency_tile_size is not None:
        return saliency_tile_size
    if tile_size is not None:
        return tile_size
    trunk = model.streaming_split()[0]  # type: ignore[operator]
    parameter = next(iter(trunk.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    return auto_tile_size(trunk, shape, budget // 2, input_dtype=dtype, input_grad=True)


def probabilities_of(info: ModelInfo, output: Tensor) -> list[float]:
    """One image's outputs as the model's task reads them: softmax (classification), a
    sigmoid per class (multilabel), the values themselves (regression)."""
    flat = output.reshape(-1).to(torch.float64)
    if info.task == "regression":
        return flat.tolist()
    return (flat.sigmoid() if info.task == "multilabel" else flat.softmax(dim=0)).tolist()


def prediction_from(info: ModelInfo, slide: str, scores: Sequence[float], target: str | None = None) -> SlidePrediction:
    """A :class:`SlidePrediction` (without heatmaps) from one image's :func:`probabilities_of`."""
    classes = list(info.classes or [])
    if len(classes) != len(scores):
        if classes:
            log.warning("the model has %d outputs but records %d class names %s; naming them by index",
                        len(scores), len(classes), classes)  # fmt: skip
        classes = [str(i) for i in range(len(scores))]
    named = {name: float(v) for name, v in zip(classes, scores)}
    if info.task == "regression":
        value = float(scores[0])
        return SlidePrediction(slide, f"{value:.4g}", None, value, {}, "regression", named, target=target)
    if info.task == "multilabel":
        label = "+".join(c for c, v in named.items() if v >= 0.5) or "none"
    else:
        label = classes[int(np.argmax(scores))]
    return SlidePrediction(slide, label, named, None, {}, str(info.task), target=target)


def predict_views(
    model: nn.Module,
    images: Tensor | RegionSource,
    views: Sequence[SlideView],
    *,
    slides: Sequence[Slide | None] | None = None,
    targets: Sequence[str | None] | None = None,
    heatmaps: Sequence[str] = ("saliency", "cam"),
    heatmap_spacing: float | None = None,
    tile_size: int | None = None,
    saliency_tile_size: int | None = None,
    memory_budget: int | str | None = None,
    reduction: str = "max_abs",
    pooling: Pooling = "mean",
    progress: Callable[[float], None] | None = None,
) -> list[SlidePrediction]:
    """Predictions with heatmaps for a batch of images that show parts of slides, each
    described by its :class:`~lightning_streaming.SlideView` (what
    :class:`~lightning_streaming.SlideDataModule`'s predict batches carry). Heatmaps cover
    each whole slide at ``heatmap_spacing``, zero outside the pixels the image shows.

    ``slides[n]`` None (or a view whose path is not a slide file) means an image without a
    slide: its heatmaps are on its own pixels and its thumbnail is the image itself.
    """
    info = model_info(model)
    kinds = check_heatmap_kinds(heatmaps, model.streaming_split()[1])  # type: ignore[operator]
    budget = inference_budget(model, memory_budget)
    saliency_tile = (
        saliency_tile_size_for(model, images.shape, tile_size, saliency_tile_size, budget) if "saliency" in kinds else 0
    )
    if slides is None:
        slides = [Slide(v.path, base_spacing=v.base_spacing) if os.path.isfile(v.path) else None for v in views]
    grids, poolers = [], []
    for view, slide in zip(views, slides):
        size = slide.size(view.spacing) if slide is not None else view.shape
        level0 = _level0_per_pixel(slide, view.spacing) if slide is not None else (1.0, 1.0)
        spacing = heatmap_spacing if heatmap_spacing is not None else _default_heatmap_spacing(size, view.spacing)
        grid = HeatmapGrid.covering(size, view.spacing, spacing, level0)
        rows, cols = grid.index(view.slide_pixels(0), 0), grid.index(view.slide_pixels(1), 1)
        grids.append(grid)
        poolers.append({k: Pooler(grid, rows, cols, pooling if k == "saliency" else "mean") for k in kinds})
    start = time.perf_counter()
    outputs = explain(
        model, images, poolers, task=str(info.task), tile_size=tile_size, saliency_tile_size=saliency_tile,
        memory_budget=budget, reduction=reduction, progress=progress,
    )  # fmt: skip
    seconds = (time.perf_counter() - start) / max(1, len(views))
    predictions = []
    for n, (view, slide, grid) in enumerate(zip(views, slides, grids)):
        target = targets[n] if targets else None
        prediction = prediction_from(info, view.path, probabilities_of(info, outputs[n]), target)
        explained = prediction.label if info.task == "classification" else None
        if info.task == "regression":
            explained = next(iter(prediction.values or {}), None)
        prediction.heatmaps = {
            kind: Heatmap(pooler.result(), grid.spacing, kind, grid.to_level0, explained)
            for kind, pooler in poolers[n].items()
        }
        prediction.spacing = view.spacing
        rows, cols = view.slide_pixels(0), view.slide_pixels(1)
        inside_rows, inside_cols = rows[rows >= 0], cols[cols >= 0]
        if inside_rows.size and inside_cols.size:
            prediction.region = ((int(inside_rows[0]), int(inside_rows[-1]) + 1),
                                 (int(inside_cols[0]), int(inside_cols[-1]) + 1))  # fmt: skip
        prediction.size = slide.size(view.spacing) if slide is not None else tuple(view.shape)
        prediction.thumbnail, prediction.thumbnail_spacing = _thumbnail(slide, images, n, grid)
        prediction.seconds = seconds
        predictions.append(prediction)
    return predictions


def _thumbnail(
    slide: Slide | None, images: Tensor | RegionSource, n: int, grid: HeatmapGrid
) -> tuple[np.ndarray | None, float]:
    """The slide at the heatmap's spacing (or the image itself, pooled to the heatmap's size)."""
    if slide is not None:
        return slide.read_array(grid.spacing), grid.spacing
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        return None, grid.spacing
    image = images[n].detach().to("cpu", torch.float64)
    if image.dtype != torch.uint8:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp_min(1e-12) * 255
    image = torch.nn.functional.adaptive_avg_pool2d(image[None], grid.shape)[0]
    image = image.expand(3, *grid.shape) if image.shape[0] == 1 else image
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), grid.spacing


def predict_slide(
    model: nn.Module,
    source: str | os.PathLike | Slide,
    spacing: float | None = None,
    *,
    heatmaps: Sequence[str] = ("saliency", "cam"),
    heatmap_spacing: float | None = None,
    tile_size: int | None = None,
    device: torch.device | str | None = None,
    base_spacing: float | None = None,
    progress: Callable[[float], None] | None = None,
    tissue: TissueDetection | None = TissueDetection(),
    saliency_tile_size: int | None = None,
    memory_budget: int | str | None = None,
    reduction: Literal["max_abs", "l2"] = "max_abs",
    pooling: Pooling = "mean",
) -> SlidePrediction:
    """Predict one slide with a trained :class:`~lightning_streaming.StreamingMixin` model,
    streamed: the slide is read lazily region by region at ``spacing`` (never whole, not even
    as uint8), its tissue only, and the trunk runs tile by tile without a graph.

    Heatmaps (each over the whole slide at ``heatmap_spacing``, zero outside the tissue):

    - ``"saliency"``: the gradient of the predicted class's score (the first output, for
      regression) with respect to the normalised input, reduced per pixel over channels
      (``reduction``: the largest absolute value, or the L2 norm) and pooled per heatmap
      pixel (``pooling``: mean or max), streamed back through the trunk one tile at a
      time; exact: the same numbers as reducing the conventional input gradient.
    - ``"cam"``: Grad-CAM on the trunk's output (cheap: the trunk's output is held).
    - ``"attention"``: the head's ``location_weights`` (see :class:`~lightning_streaming.LocationWeights`).

    Args:
        model: the model (e.g. from :func:`~lightning_streaming.load_model`); it runs in eval mode.
        source: a slide file (whatever :class:`~lightning_streaming.Slide` opens: OpenSlide
            formats, JPEG/PNG/TIFF) or a Slide.
        spacing: um per pixel to read the slide at; None: the model's training spacing.
        heatmaps: which heatmaps to make (any of ``"saliency"``, ``"cam"``, ``"attention"``).
        heatmap_spacing: um per heatmap pixel; None: about 1024 px on the slide's long side.
        tile_size: tile size of the forward pass, and of the saliency pass when given.
            Default: the core's planner chooses within ``memory_budget`` (no graph is kept,
            so a forward tile can be far larger than a training tile; see ``ls.stream_plan``).
        device: where the model runs (it is moved there); None: where it is.
        base_spacing: um per pixel to assume for an image that records none (default: the
            model's spacing).
        progress: called with the fraction done (0..1) as tiles finish.
        tissue: tissue detection (the prediction covers the tissue's bounding box); None
            for the whole slide.
        saliency_tile_size: tile size of the saliency pass (default: ``tile_size``, else the
            largest whose tile-by-tile backward fits ``memory_budget``).
        memory_budget: bytes (or ``"2GiB"``) the streamed trunk may use when the tiles are
            chosen for you; default: a quarter of the memory available on the model's device.
        reduction, pooling: see ``"saliency"`` above.

    Returns:
        A :class:`~lightning_streaming.SlidePrediction`.

    Raises:
        SlideNotFoundError, SlideOpenError: the slide is missing or cannot be read.
        SpacingError: ``spacing`` is finer than the slide's level 0.
        MissingSpacingError: neither the slide nor the model nor ``base_spacing`` gives a pixel size.

    Example::

        model = ls.load_model("model.ckpt", "examples.slide_demo:SlideClassifier")
        prediction = ls.predict_slide(model, "slide.svs", heatmaps=("saliency", "cam"))
        print(prediction.label, prediction.probabilities)
        ls.write_prediction(prediction, "out/")
    """
    if device is not None:
        model.to(device)
    info = model_info(model)
    slide = open_slide(source, base_spacing if base_spacing is not None else (info.spacing or spacing))
    spacing = spacing if spacing is not None else info.spacing
    if spacing is None:
        raise ValueError(
            f"{type(model).__name__} records no training spacing, so pass spacing= (um per pixel to read "
            f"{slide.path.name} at; --spacing on the command line)"
        )
    _check_spacing(slide, float(spacing), info)
    size = slide.size(spacing)
    layout = Layout.full(size)
    if tissue is not None:
        detection = dataclasses.replace(tissue, spacing=max(tissue.spacing, max(slide.base_spacing or (0.0,))))
        mask = detection.detect(slide)
        if mask.empty:
            log.warning("no tissue found in %s: predicting the whole slide", slide.path)
        layout = Layout.from_mask(mask, spacing, size)
    view = SlideView(str(slide.path), float(spacing), None, layout.rows, layout.cols, (0, 0), layout.shape, 0)
    source_image = SlideRegionSource(slide, spacing, layout)
    (prediction,) = predict_views(
        model, source_image, [view], slides=[slide], heatmaps=heatmaps, heatmap_spacing=heatmap_spacing,
        tile_size=tile_size, saliency_tile_size=saliency_tile_size, memory_budget=memory_budget, reduction=reduction,
        pooling=pooling, progress=progress,
    )  # fmt: skip
    return prediction


def predict_slides(
    model: nn.Module,
    sources: Sequence[str | os.PathLike | Slide],
    spacing: float | None = None,
    *,
    progress: Callable[[float], None] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    **options,
) -> list[SlidePrediction]:
    """:func:`predict_slide` for each of ``sources`` (same options), with one progress over
    all of them. With ``on_error="skip"`` a slide that fails is logged and left out.

    Example::

        predictions = ls.predict_slides(model, ["a.svs", "b.svs"], heatmaps=("cam",))
        ls.write_predictions(predictions, "out/")
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    results = []
    for index, source in enumerate(sources):
        step = None
        if progress is not None:
            step = lambda fraction, i=index: progress((i + fraction) / len(sources))  # noqa: E731
        try:
            results.append(predict_slide(model, source, spacing, progress=step, **options))
        except Exception as error:  # noqa: BLE001 - reported per slide under on_error="skip"
            if on_error == "raise":
                raise
            log.error("could not predict %s: %s", source, error)
    return results

