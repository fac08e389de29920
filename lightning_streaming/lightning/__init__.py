"""Lightning integration: the StreamingMixin, the streaming strategies, StreamingLSUV.

Works with ``lightning`` (``import lightning as L``) and ``pytorch_lightning``. The
Lightning-typed classes (the strategies, StreamingLSUV) are written once and built for the
package in use when accessed (see :mod:`._compat`); ``X.for_package(pl)`` picks one
explicitly. Nothing here imports Lightning until such a class is used. Importing this package
registers ``"streaming"``, ``"streaming_ddp"`` and ``"streaming_ddp_spawn"`` in each
Lightning package's StrategyRegistry as soon as that package is imported, so
``Trainer(strategy=...)`` and LightningCLI accept them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from ._registration import register_strategy_names

if TYPE_CHECKING:
    from .auto_tile import auto_tile_size, estimate_tile_memory
    from .lsuv import StreamingLSUV
    from .mixin import StreamingMixin
    from .info import ModelInfo, model_info
    from .settings import DEFAULT_TILE_SIZE, StreamingSettings
    from .split import split_at
    from .strategies import StreamingDDPStrategy, StreamingStrategy

register_strategy_names()

_WHERE = {
    "DEFAULT_TILE_SIZE": ".settings",
    "StreamingDDPStrategy": ".strategies",
    "StreamingLSUV": ".lsuv",
    "StreamingMixin": ".mixin",
    "ModelInfo": ".info",
    "model_info": ".info",
    "StreamingSettings": ".settings",
    "StreamingStrategy": ".strategies",
    "auto_tile_size": ".auto_tile",
    "estimate_tile_memory": ".auto_tile",
    "split_at": ".split",
}
#: Built for the Lightning package in use at each access.
LIGHTNING_TYPED = ("StreamingDDPStrategy", "StreamingLSUV", "StreamingStrategy")

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE, LIGHTNING_TYPED)

__all__ = sorted(_WHERE)
