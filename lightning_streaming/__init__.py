"""lightning_streaming: train CNNs end to end on gigapixel images by streaming.

The public API lives here and only here.
"""

from .core import (
    ChannelMoments,
    channel_moments,
    trunk_layers,
    NotLocalError,
    OpCall,
    OpGeometry,
    Refusal,
    RegionSource,
    Segment,
    StreamingError,
    StreamingMismatchError,
    TileTooSmallError,
    TilePlan,
    VerificationReport,
    Window,
    pixelwise,
    register_module_rule,
    stream,
    tile_plan,
    verify,
)
from .lightning import (
    StreamingDDPStrategy,
    StreamingMixin,
    StreamingSettings,
    StreamingStrategy,
    auto_tile_size,
    estimate_tile_memory,
    split_at,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelMoments",
    "channel_moments",
    "trunk_layers",
    "NotLocalError",
    "OpCall",
    "OpGeometry",
    "Refusal",
    "RegionSource",
    "Segment",
    "StreamingError",
    "StreamingMismatchError",
    "TileTooSmallError",
    "TilePlan",
    "VerificationReport",
    "Window",
    "pixelwise",
    "register_module_rule",
    "stream",
    "tile_plan",
    "verify",
    # Lightning integration
    "StreamingDDPStrategy",
    "StreamingMixin",
    "StreamingSettings",
    "StreamingStrategy",
    "auto_tile_size",
    "estimate_tile_memory",
    "split_at",
]
