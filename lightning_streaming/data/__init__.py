"""Whole-slide data: reading by spacing, tissue detection and cropping, manifests, datasets
with augmentation, samplers, a DataModule, and lazy slide inputs for the streamer.

Only :mod:`.datamodule` imports Lightning; everything else is plain PyTorch.
"""

from .augment import Augmentation, ColourJitter, Orientation
from .dataset import SlideDataset, collate_slides
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

__all__ = [
    "Augmentation",
    "ClassBalancedSampler",
    "ColourJitter",
    "EpochSampler",
    "ExampleSlides",
    "PackageFile",
    "LabelParseError",
    "Layout",
    "LevelChoice",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "MissingSpacingError",
    "Orientation",
    "RegionOutOfBoundsError",
    "Slide",
    "SlideDataModule",
    "SlideDataset",
    "SlideError",
    "SlideNotFoundError",
    "SlideOpenError",
    "SlideReadError",
    "SlideRegionSource",
    "SpacingError",
    "StackedSource",
    "TensorSource",
    "TissueDetection",
    "TissueMask",
    "Uint8Normalize",
    "channel_mean_std",
    "collate_slides",
    "detect_tissue",
    "example_slides",
    "fetch_package_files",
    "read_all",
]


def __getattr__(name: str):
    # The DataModule needs Lightning: import it only when asked for.
    if name == "SlideDataModule":
        from .datamodule import SlideDataModule

        return SlideDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
