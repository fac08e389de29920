"""lightning_streaming: train CNNs end to end on gigapixel images by streaming.

The public API lives here and only here.
"""

from .core import (
    NotLocalError,
    OpCall,
    OpGeometry,
    Refusal,
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

__version__ = "0.1.0"

__all__ = [
    "NotLocalError",
    "OpCall",
    "OpGeometry",
    "Refusal",
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
]
