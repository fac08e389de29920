"""Register "streaming", "streaming_ddp" and "streaming_ddp_spawn" in the StrategyRegistry of
each Lightning package, as soon as that package is imported (before or after us)."""

from __future__ import annotations

from types import ModuleType

from ._after_import import call_after_import
from ._compat import PACKAGES, lightning_import


def _register(package: ModuleType) -> None:
    from .strategies import StreamingDDPStrategy, StreamingStrategy

    registry = lightning_import(package, "strategies").StrategyRegistry
    for template in (StreamingStrategy, StreamingDDPStrategy):
        template.for_package(package).register_strategies(registry)


def register_strategy_names() -> None:
    """Arrange for our strategy names to be registered in every Lightning package: now in
    those already imported, later in the others right after their import."""
    for package in PACKAGES:
        call_after_import(package, _register)
