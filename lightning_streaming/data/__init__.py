"""Whole-slide data: reading by spacing, tissue detection and cropping, manifests, datasets
with augmentation, samplers, a DataModule, and lazy slide inputs for the streamer.

Names are imported on first use: OpenSlide only with the slide reader, Lightning only with
:class:`SlideDataModule` (built for the Lightning package in use, like the strategies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .augment import Augmentation, ColourJitter, Orientation
    from .datamodule import SlideDataModule
    from .dataset import SlideBatch, SlideDataset, SlideView, collate_slides
    from .errors import (
        LabelParseError,
        ManifestError,
        MissingSpacingError,
        RegionOutOfBoundsError,
        SlideError,
        SlideNotFoundError,
        SlideOpenError,
        SlideReadError,
        SpacingError,
    )
    from .layout import Layout
    from .manifest import Manifest, ManifestRow
    from .normalize import Uint8Normalize
    from .sample_data import ExampleSlides, PackageFile, example_slides, fetch_package_files
    from .sampler import ClassBalancedSampler, EpochSampler
    from .slide import LevelChoice, Slide
    from .source import SlideRegionSource, StackedSource, TensorSource, read_all
    from .stats import channel_mean_std
    from .tissue import TissueDetection, TissueMask, detect_tissue

_WHERE = {
    "Augmentation": ".augment",
    "ColourJitter": ".augment",
    "Orientation": ".augment",
    "SlideDataModule": ".datamodule",
    "SlideBatch": ".dataset",
    "SlideDataset": ".dataset",
    "SlideView": ".dataset",
    "collate_slides": ".dataset",
    "LabelParseError": ".errors",
    "ManifestError": ".errors",
    "MissingSpacingError": ".errors",
    "RegionOutOfBoundsError": ".errors",
    "SlideError": ".errors",
    "SlideNotFoundError": ".errors",
    "SlideOpenError": ".errors",
    "SlideReadError": ".errors",
    "SpacingError": ".errors",
    "Layout": ".layout",
    "Manifest": ".manifest",
    "ManifestRow": ".manifest",
    "Uint8Normalize": ".normalize",
    "ExampleSlides": ".sample_data",
    "PackageFile": ".sample_data",
    "example_slides": ".sample_data",
    "fetch_package_files": ".sample_data",
    "ClassBalancedSampler": ".sampler",
    "EpochSampler": ".sampler",
    "LevelChoice": ".slide",
    "Slide": ".slide",
    "SlideRegionSource": ".source",
    "StackedSource": ".source",
    "TensorSource": ".source",
    "read_all": ".source",
    "channel_mean_std": ".stats",
    "TissueDetection": ".tissue",
    "TissueMask": ".tissue",
    "detect_tissue": ".tissue",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, lightning_typed=("SlideDataModule",))

__all__ = sorted(_WHERE)
