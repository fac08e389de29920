"""Lightning integration: the StreamingMixin, the streaming strategies and their registry names.

Importing this package registers ``"streaming"``, ``"streaming_ddp"`` and
``"streaming_ddp_spawn"`` in Lightning's StrategyRegistry, so ``Trainer(strategy=...)``
and LightningCLI accept them.
"""

from pytorch_lightning.strategies import StrategyRegistry

from .auto_tile import auto_tile_size, estimate_tile_memory
from .lsuv import StreamingLSUV
from .mixin import StreamingMixin
from .settings import DEFAULT_TILE_SIZE, StreamingSettings
from .split import split_at
from .strategies import StreamingDDPStrategy, StreamingStrategy

StreamingStrategy.register_strategies(StrategyRegistry)
StreamingDDPStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "DEFAULT_TILE_SIZE",
    "StreamingDDPStrategy",
    "StreamingLSUV",
    "StreamingMixin",
    "StreamingSettings",
    "StreamingStrategy",
    "auto_tile_size",
    "estimate_tile_memory",
    "split_at",
]
