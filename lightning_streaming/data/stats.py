"""Per-channel mean and standard deviation of a training set, for normalisation.

Command line::

    python -m lightning_streaming.data.stats train.csv --spacing 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Iterable

import torch
from torch import Tensor

from ..core import RegionSource

__all__ = ["channel_mean_std"]

log = logging.getLogger(__name__)


def channel_mean_std(
    images: Iterable[Tensor | RegionSource | tuple], *, rows_per_read: int = 1024
) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel, in [0, 1] units, over every pixel of
    ``images`` (float64 sums of x and x^2, so exact to rounding for any number of pixels).

    Args:
        images: uint8 ``(C, H, W)`` or ``(N, C, H, W)`` tensors or region sources, or
            ``(image, target)`` pairs (a :class:`SlideDataset` iterates like that: use one
            with ``train=False``, so the statistics are not those of augmented images).
            Sources are read in bands of ``rows_per_read`` rows.

    Returns:
        ``(mean, std)``, lists with one value per channel, for :class:`Uint8Normalize`.

    Example::

        dataset = ls.SlideDataset("train.csv", spacing=8.0, lazy=True)   # whole tissue images
        mean, std = ls.channel_mean_std(dataset)
    """
    count, total, squares = 0, None, None
    for item in images:
        image = item[0] if isinstance(item, tuple) else item
        bands: Iterable[Tensor]
        if isinstance(image, Tensor):
            bands = [image if image.dim() == 4 else image[None]]
        else:
            bands = _bands(image, rows_per_read)
        for band in bands:
            x = band.to(torch.float64).transpose(0, 1).flatten(1) / 255  # (C, pixels)
            total = x.sum(1) if total is None else total + x.sum(1)
            squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
            count += x.shape[1]
    if total is None or squares is None or count == 0:
        raise ValueError("channel_mean_std got no images")
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def _bands(source: RegionSource, rows: int) -> Iterable[Tensor]:
    spatial = tuple(source.shape[2:])
    for start in range(0, spatial[0], rows):
        region = (slice(start, min(spatial[0], start + rows)), *(slice(0, n) for n in spatial[1:]))
        yield source.read(region)


def main(argv: list[str] | None = None) -> int:
    from .dataset import SlideDataset
    from .tissue import TissueDetection

    parser = argparse.ArgumentParser(
        prog="python -m lightning_streaming.data.stats",
        description="Per-channel mean and std of a slide manifest at a spacing",
    )
    parser.add_argument("manifest", help="CSV manifest (slide column plus targets)")
    parser.add_argument("--spacing", type=float, required=True, help="um per pixel")
    parser.add_argument("--no-tissue", action="store_true", help="use whole slides, not their tissue bounding box")
    parser.add_argument("--task", default="classification", choices=["classification", "multilabel", "regression"])
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    dataset = SlideDataset(
        args.manifest,
        args.spacing,
        tissue=None if args.no_tissue else TissueDetection(),
        lazy=True,
        task=args.task,
        on_error=args.on_error,
    )
    mean, std = channel_mean_std(dataset[i] for i in range(len(dataset)))
    json.dump({"mean": mean, "std": std, "spacing": args.spacing, "slides": len(dataset)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
