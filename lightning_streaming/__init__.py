"""lightning_streaming: train CNNs end to end on gigapixel images by streaming.

The public API lives here and only here. Using a trained model: ``load_model``,
``model_info``, ``predict_slide``, ``write_prediction``, ``render_overlay`` (and the
``lightning-streaming predict`` command). Names are imported on first use, so ``import
lightning_streaming`` imports neither Lightning nor OpenSlide: plain-PyTorch streaming
(``ls.stream``) never pays for them. The Lightning-typed classes (``StreamingStrategy``,
``StreamingDDPStrategy``, ``StreamingLSUV``, ``SlideDataModule``) are built for the Lightning
package in use (``lightning`` or ``pytorch_lightning``) at each access; ``X.for_package(pl)``
picks one explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import lightning as _lightning  # noqa: F401 - registers our strategy names in Lightning, lazily
from ._lazy import lazy_attributes

if TYPE_CHECKING:
    from .core import (
        ChannelMoments,
        NotLocalError,
        OpCall,
        OpGeometry,
        Refusal,
        RegionSource,
        Segment,
        StreamingError,
        StreamingMismatchError,
        TilePlan,
        TileTooSmallError,
        VerificationReport,
        Window,
        channel_moments,
        pixelwise,
        register_module_rule,
        stream,
        tile_plan,
        trunk_layers,
        verify,
    )
    from .data import (
        Augmentation,
        ClassBalancedSampler,
        ColourJitter,
        EpochSampler,
        ExampleSlides,
        LabelParseError,
        Layout,
        LevelChoice,
        Manifest,
        ManifestError,
        MissingSpacingError,
        Orientation,
        PackageFile,
        RegionOutOfBoundsError,
        Slide,
        SlideDataModule,
        SlideBatch,
        SlideDataset,
        SlideError,
        SlideNotFoundError,
        SlideOpenError,
        SlideReadError,
        SlideRegionSource,
        SlideView,
        SpacingError,
        StackedSource,
        TensorSource,
        TissueDetection,
        TissueMask,
        Uint8Normalize,
        channel_mean_std,
        collate_slides,
        detect_tissue,
        example_slides,
        fetch_package_files,
        read_all,
    )
    from .inference import (
        CheckpointError,
        Heatmap,
        LocationWeights,
        OutputError,
        PredictionWriter,
        SlidePrediction,
        load_model,
        predict_slide,
        predict_slides,
        render_overlay,
        write_prediction,
        write_predictions,
    )
    from .lightning import (
        ModelInfo,
        StreamingDDPStrategy,
        StreamingLSUV,
        StreamingMixin,
        StreamingSettings,
        StreamingStrategy,
        auto_tile_size,
        estimate_tile_memory,
        model_info,
        split_at,
    )

__version__ = "0.1.0"

_CORE = (
    "ChannelMoments", "channel_moments", "trunk_layers", "NotLocalError", "OpCall", "OpGeometry", "Refusal",
    "RegionSource", "Segment", "StreamingError", "StreamingMismatchError", "TileTooSmallError", "TilePlan",
    "VerificationReport", "Window", "pixelwise", "register_module_rule", "stream", "tile_plan", "verify",
)  # fmt: skip
_LIGHTNING = (
    "ModelInfo", "StreamingDDPStrategy", "StreamingLSUV", "StreamingMixin", "StreamingSettings", "StreamingStrategy",
    "auto_tile_size", "estimate_tile_memory", "model_info", "split_at",
)  # fmt: skip
_DATA = (
    "Augmentation", "ClassBalancedSampler", "ColourJitter", "EpochSampler", "ExampleSlides", "PackageFile",
    "LabelParseError", "Layout", "LevelChoice", "Manifest", "ManifestError", "MissingSpacingError", "Orientation",
    "RegionOutOfBoundsError", "Slide", "SlideBatch", "SlideDataModule", "SlideDataset", "SlideError",
    "SlideNotFoundError", "SlideOpenError", "SlideReadError", "SlideRegionSource", "SlideView", "SpacingError",
    "StackedSource", "TensorSource",
    "TissueDetection", "TissueMask", "Uint8Normalize", "channel_mean_std", "collate_slides", "detect_tissue",
    "example_slides", "fetch_package_files", "read_all",
)  # fmt: skip

_INFERENCE = (
    "CheckpointError", "Heatmap", "LocationWeights", "OutputError", "PredictionWriter", "SlidePrediction",
    "load_model", "predict_slide", "predict_slides", "render_overlay", "write_prediction", "write_predictions",
)  # fmt: skip

__all__ = [*_CORE, *_LIGHTNING, *_DATA, *_INFERENCE]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **{n: ".core" for n in _CORE},
        **{n: ".lightning" for n in _LIGHTNING},
        **{n: ".data" for n in _DATA},
        **{n: ".inference" for n in _INFERENCE},
    },
    lightning_typed=(
        "StreamingDDPStrategy", "StreamingLSUV", "StreamingStrategy", "SlideDataModule", "PredictionWriter",
    ),  # fmt: skip
)
