"""Pure-PyTorch streaming: exact tiled forward and backward of local CNN trunks.

Nothing here imports Lightning.
"""

from .errors import NotLocalError, StreamingError, StreamingMismatchError, TileTooSmallError
from .graph import TrunkGeometry, geometry_of
from .tracing import expected_spatial_dims
from .plan import Segment, TilePlan
from .rules import OpCall, OpGeometry, Refusal, pixelwise, register_module_rule
from .source import RegionSource
from .statistics import ChannelMoments, channel_moments, trunk_layers
from .stream import input_gradients, stream, tile_plan
from .verify import VerificationReport, verify
from .window import Window

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
    "TrunkGeometry",
    "VerificationReport",
    "Window",
    "expected_spatial_dims",
    "geometry_of",
    "input_gradients",
    "pixelwise",
    "register_module_rule",
    "stream",
    "tile_plan",
    "verify",
]
