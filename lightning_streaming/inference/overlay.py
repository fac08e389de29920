"""A heatmap over the slide's thumbnail as one picture a reader can take in: the overlay, a
colour bar, the predicted class and what the heatmap shows. Pillow and numpy only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tissue import gaussian_blur
from .records import Heatmap, SlidePrediction

__all__ = ["COLORMAPS", "colorize", "render_overlay"]

# 17 samples of matplotlib's colormaps (perceptually uniform inferno and viridis; turbo, a
# smooth jet), interpolated linearly: no matplotlib needed to draw a heatmap.
COLORMAPS: dict[str, np.ndarray] = {
    "inferno": np.array([
        (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110), (138, 34, 106),
        (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9), (252, 172, 17),
        (249, 203, 53), (242, 234, 105), (252, 255, 164),
    ], dtype=np.float64),
    "viridis": np.array([
        (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141), (44, 114, 142),
        (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115), (94, 201, 98),
        (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37),
    ], dtype=np.float64),
    "turbo": np.array([
        (48, 18, 59), (64, 64, 162), (70, 107, 227), (66, 148, 255), (40, 188, 235), (24, 221, 194), (50, 242, 152),
        (109, 254, 98), (164, 252, 60), (205, 236, 52), (238, 207, 58), (253, 172, 52), (251, 126, 33), (235, 80, 14),
        (208, 47, 5), (169, 22, 1), (122, 4, 3),
    ], dtype=np.float64),
}  # fmt: skip

_DESCRIPTIONS = {
    "saliency": "saliency{target}: where changing the pixels changes the score most",
    "cam": "class activation map (Grad-CAM){target}: features that raise the score",
    "attention": "attention: how much each location counts in the head's pooling",
}
_MIN_SIDE = 640  # the picture is scaled up to at least this (long side), for small thumbnails
_MAX_SIDE = 1400


def colorize(values: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """``values`` in [0, 1] ``(H, W)`` as ``(H, W, 3)`` uint8 colours of ``colormap``."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    table = COLORMAPS[colormap]
    position = np.clip(values, 0, 1) * (len(table) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(table) - 2)
    fraction = (position - low)[..., None]
    return np.rint(table[low] * (1 - fraction) + table[low + 1] * fraction).astype(np.uint8)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a small bitmap font only
        return ImageFont.load_default()


def display_range(heatmap: Heatmap, analysed: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """The values as drawn (saliency lightly smoothed), the level below which nothing is
    drawn (the median over the analysed area, as the paper's Fig. 4 shows its upper half)
    and the level at which colour saturates (99th percentile: a few large gradients would
    otherwise wash out the rest). ``analysed``: the heatmap pixels that were computed."""
    values = heatmap.values.astype(np.float64)
    if heatmap.kind == "saliency" and min(values.shape) > 8:
        # Gradients are speckled pixel by pixel; the paper blurs them too (sigma 50 px on 8192 px images).
        values = gaussian_blur(torch.from_numpy(values), max(1.0, max(values.shape) / 160)).numpy()
    inside = values[analysed] if analysed is not None else values[heatmap.values > 0]
    if inside.size == 0 or not inside.any():
        return values, 0.0, 1.0
    low, high = float(np.percentile(inside, 50)), float(np.percentile(inside, 99))
    if high <= low:
        high = low + max(abs(low), 1e-12)
    return values, low, high


def _title(prediction: SlidePrediction, heatmap: Heatmap) -> tuple[str, str]:
    if prediction.probabilities is not None and prediction.task == "classification":
        headline = f"Predicted: {prediction.label}  (p = {prediction.probabilities.get(prediction.label, 0):.2f})"
    elif prediction.task == "multilabel":
        headline = f"Predicted labels: {prediction.label}"
    else:
        headline = f"Predicted value: {prediction.label}"
    if prediction.target is not None:
        headline += f"    manifest: {prediction.target}"
    name = Path(prediction.slide).name
    explained = f" for '{heatmap.target}'" if heatmap.target else ""
    what = _DESCRIPTIONS.get(heatmap.kind, heatmap.kind + "{target}").format(target=explained)
    return headline, f"{name}  ·  {what}  ·  {heatmap.spacing:.3g} um/px"


def render_overlay(
    prediction: SlidePrediction, heatmap: str = "saliency", opacity: float = 0.5, *, colormap: str = "inferno"
) -> Any:
    """The heatmap over the slide's thumbnail as a ``PIL.Image``: the predicted class (and
    probability) and what the heatmap shows above it, a colour bar beside it.

    Values below the median over the analysed area are not drawn, so the tissue stays
    visible where the model does not look; colour and opacity grow to the 99th
    percentile (saliency is smoothed by one heatmap pixel first), as in the streaming
    paper's Fig. 4.

    Args:
        prediction: from :func:`~lightning_streaming.predict_slide`.
        heatmap: which of ``prediction.heatmaps`` to draw.
        opacity: of the strongest values, 0 (invisible) to 1 (opaque).
        colormap: ``"inferno"`` (default), ``"viridis"`` or ``"turbo"``.

    Example::

        ls.render_overlay(prediction, "cam", opacity=0.6).save("cam.png")
    """
    from PIL import Image, ImageDraw

    if heatmap not in prediction.heatmaps:
        raise KeyError(f"prediction has no {heatmap!r} heatmap; it has {sorted(prediction.heatmaps) or 'none'}")
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity!r}")
    chosen = prediction.heatmaps[heatmap]
    values, low, high = display_range(chosen, analysed_pixels(prediction, chosen))
    size = (values.shape[1], values.shape[0])
    if prediction.thumbnail is not None:
        base = Image.fromarray(prediction.thumbnail).convert("RGB").resize(size, Image.BILINEAR)
    else:
        base = Image.new("RGB", size, (255, 255, 255))
    scale = max(1.0, _MIN_SIDE / max(size)) if max(size) < _MIN_SIDE else min(1.0, _MAX_SIDE / max(size))
    shown = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    level = np.clip((values - low) / (high - low), 0, 1)
    # Much enlarged (a small image): show its pixels as they are rather than a blur.
    smooth, sharp = (Image.NEAREST, Image.NEAREST) if scale >= 4 else (Image.BILINEAR, Image.LANCZOS)
    colours = Image.fromarray(colorize(level, colormap)).resize(shown, smooth)
    alpha = Image.fromarray(np.rint(255 * opacity * level).astype(np.uint8)).resize(shown, smooth)
    picture = base.resize(shown, sharp)
    picture.paste(colours, (0, 0), alpha)
    region = _region_box(prediction, shown)
    if region is not None:
        ImageDraw.Draw(picture).rectangle(region, outline=(40, 120, 220), width=2)

    title_font, text_font = _font(max(16, shown[0] // 32)), _font(max(12, shown[0] // 60))
    headline, detail = _title(prediction, chosen)
    margin, bar_width = 16, max(18, shown[0] // 40)
    title_height = title_font.size + text_font.size + 3 * margin if hasattr(title_font, "size") else 60
    legend_width = bar_width + 8 * text_font.size if hasattr(text_font, "size") else 140
    canvas = Image.new("RGB", (shown[0] + legend_width + 3 * margin, shown[1] + title_height + margin), "white")
    canvas.paste(picture, (margin, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), headline, fill=(20, 20, 20), font=title_font)
    draw.text((margin, margin * 2 + getattr(title_font, "size", 20)), detail, fill=(70, 70, 70), font=text_font)
    draw.rectangle([margin - 1, title_height - 1, margin + shown[0], title_height + shown[1]], outline=(160, 160, 160))

    # Colour bar: the drawn range, strongest at the top.
    x0, y0 = 2 * margin + shown[0], title_height
    bar_height = max(60, min(shown[1], 400))
    ramp = np.linspace(1, 0, bar_height)[:, None].repeat(bar_width, axis=1)
    canvas.paste(Image.fromarray(colorize(ramp, colormap)), (x0, y0))
    draw.rectangle([x0 - 1, y0 - 1, x0 + bar_width, y0 + bar_height], outline=(120, 120, 120))
    for fraction, text in ((0.0, f"{high:.2g}  (99th pct)"), (1.0, f"{low:.2g}  (median)")):
        y = y0 + fraction * (bar_height - 1)
        draw.line([x0 + bar_width, y, x0 + bar_width + 4, y], fill=(60, 60, 60))
        draw.text((x0 + bar_width + 7, y - getattr(text_font, "size", 10) / 2), text, fill=(40, 40, 40), font=text_font)
    notes = f"{heatmap}\n(not drawn\nbelow median)" + ("\n\nblue box:\nanalysed tissue" if region else "")
    draw.text((x0, y0 + bar_height + 6), notes, fill=(70, 70, 70), font=text_font)
    return canvas


def analysed_pixels(prediction: SlidePrediction, heatmap: Heatmap) -> np.ndarray | None:
    """Heatmap pixels inside the analysed region (approximately: by scale)."""
    if prediction.region is None or prediction.size is None:
        return None
    mask = np.zeros(heatmap.values.shape, dtype=bool)
    (r0, r1), (c0, c1) = prediction.region
    sy, sx = heatmap.values.shape[0] / prediction.size[0], heatmap.values.shape[1] / prediction.size[1]
    top, left = int(r0 * sy), int(c0 * sx)
    mask[top : max(top + 1, int(np.ceil(r1 * sy))), left : max(left + 1, int(np.ceil(c1 * sx)))] = True
    return mask


def _region_box(prediction: SlidePrediction, shown: tuple[int, int]) -> list[float] | None:
    """The analysed region in picture pixels, when it is not the whole slide."""
    if prediction.region is None or prediction.size is None:
        return None
    (r0, r1), (c0, c1) = prediction.region
    height, width = prediction.size
    if (r0, c0) == (0, 0) and (r1, c1) == (height, width):
        return None
    sy, sx = shown[1] / height, shown[0] / width
    return [c0 * sx, r0 * sy, c1 * sx - 1, r1 * sy - 1]


def save_overlay(prediction: SlidePrediction, heatmap: str, path: str | os.PathLike, opacity: float = 0.5) -> Path:
    """:func:`render_overlay` saved as a PNG."""
    path = Path(path)
    render_overlay(prediction, heatmap, opacity).save(path, format="PNG")
    return path
