"""Pure-PyTorch streaming: exact tiled forward and backward of local CNN trunks.

Nothing here imports Lightning.
"""

from .budget import parse_bytes
from .errors import NotLocalError, StreamingError, StreamingMismatchError, TileTooSmallError
from .graph import TrunkGeometry, geometry_of
from .memory import estimate_tile_memory
from .tracing import expected_spatial_dims
from .plan import Segment, TilePlan
from .schedule import StreamPlan
from .rules import OpCall, OpGeometry, Refusal, pixelwise, register_module_rule
from .source import RegionSource
from .statistics import ChannelMoments, channel_moments, trunk_layers
from .speed import DeviceSpeed, device_speed, measure_speed, nominal_speed, set_device_speed
from .stream import input_gradients, stream, stream_plan, tile_plan
from .verify import VerificationReport, verify
from .window import Window

__all__ = [
    "ChannelMoments",
    "DeviceSpeed",
    "StreamPlan",
    "channel_moments",
    "device_speed",
    "estimate_tile_memory",
    "measure_speed",
    "nominal_speed",
    "parse_bytes",
    "set_device_speed",
    "stream_plan",
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
