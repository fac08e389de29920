"""StreamingMixin: a LightningModule whose trunk is streamed when the strategy says so."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..core.source import is_region_source
from .settings import StreamingSettings, TileSize


class StreamingMixin:
    """Mix into a :class:`~pytorch_lightning.core.LightningModule` whose network is a
    *trunk* of local layers (streamed: run tile by tile) followed by a *head* (run
    normally: global pooling, BatchNorm, Linear, anything).

    The model declares the split: either attributes ``self.trunk`` and ``self.head``, or an
    override of :meth:`streaming_split`. :func:`~lightning_streaming.split_at` splits an
    existing network (e.g. a torchvision ResNet) at a named child.

    ``self(x)`` is ``self.head(self.forward_trunk(x))``. :meth:`forward_trunk` streams the
    trunk when the Trainer's strategy is a streaming one
    (:class:`~lightning_streaming.StreamingStrategy`,
    :class:`~lightning_streaming.StreamingDDPStrategy`, ``strategy="streaming"`` or
    ``"streaming_ddp"``) and runs it conventionally otherwise (no Trainer, or any other
    strategy), with the same numbers either way. Training, validation, test and predict
    steps all stream; outside training no graph is kept. Automatic optimization, gradient
    accumulation and clipping, optimizers, schedulers, mixed precision and checkpoints are
    Lightning's own and work unchanged. Override :meth:`forward` freely: call
    :meth:`forward_trunk` where the trunk runs.

    What a model may set:

    - ``default_tile_size`` (class attribute): the tile size to use when the strategy
      does not set one (tile size is a hardware concern, so the strategy's setting wins).
    - ``tile_transform``: a method ``tile_transform(self, tile)`` (or a callable assigned
      in ``__init__``), a per-pixel function such as normalising uint8 pixels to float,
      applied to each tile on its device before the trunk, so the full float image never
      exists. Conventionally it is applied to the whole input. It must be pixel-wise: it
      is not analysed.

    Example::

        import pytorch_lightning as pl
        import torch
        from torch import nn
        import lightning_streaming as ls

        class SlideClassifier(ls.StreamingMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1))
                self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=2048), max_epochs=1)
    """

    default_tile_size: TileSize | None = None
    tile_transform: Callable[[Tensor], Tensor] | None = None

    def streaming_split(self) -> tuple[nn.Module, nn.Module]:
        """The ``(trunk, head)`` pair; by default the attributes ``trunk`` and ``head``."""
        trunk, head = getattr(self, "trunk", None), getattr(self, "head", None)
        if not isinstance(trunk, nn.Module) or not isinstance(head, nn.Module):
            missing = [name for name, m in (("trunk", trunk), ("head", head)) if not isinstance(m, nn.Module)]
            raise AttributeError(
                f"{type(self).__name__} uses StreamingMixin but has no module attribute "
                f"{' or '.join(map(repr, missing))}: "
                "set self.trunk (the streamed, local layers) and self.head (the rest) in __init__, e.g. "
                "self.trunk, self.head = lightning_streaming.split_at(network, 'layer2'), or override streaming_split()"
            )
        return trunk, head

    @property
    def streaming_settings(self) -> StreamingSettings | None:
        """The attached Trainer's streaming settings; None when the trunk runs conventionally."""
        trainer = getattr(self, "_trainer", None)  # LightningModule.trainer raises when detached
        settings = getattr(trainer.strategy, "streaming", None) if trainer is not None else None
        return settings if isinstance(settings, StreamingSettings) else None

    def streaming_transform(self) -> Callable[[Tensor], Tensor] | None:
        """The model's ``tile_transform``, whether a method, a callable or a module."""
        # A module assigned to self.tile_transform lives in _modules, hidden by the class attribute.
        return self._modules.get("tile_transform", self.tile_transform)  # type: ignore[attr-defined]

    def forward_trunk(self, x: Tensor) -> Tensor:
        """The trunk's output for ``x``: streamed under a streaming strategy, else conventional."""
        trunk = self.streaming_split()[0]
        transform = self.streaming_transform()
        if transform is None:
            _check_float_input(type(self).__name__, x)
        settings = self.streaming_settings
        if settings is None:
            if is_region_source(x):  # a lazy input run conventionally is read whole, as a conventional run would
                x = x.read(tuple(slice(0, n) for n in x.shape[2:]))
            return trunk(x if transform is None else transform(x))
        device = self._trainer.strategy.root_device  # type: ignore[attr-defined]
        return settings.stream(trunk, x, device, transform=transform, default_tile_size=self.default_tile_size)

    def forward(self, x: Tensor) -> Any:
        """``head(forward_trunk(x))``."""
        return self.streaming_split()[1](self.forward_trunk(x))


def _check_float_input(model: str, x: Any) -> None:
    """Refuse integer images without a ``tile_transform``, naming the model's fix (the core's
    message speaks of ``stream(transform=)``, which a Lightning user never calls)."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise TypeError(
            f"{model} got images of dtype {dtype}, but its trunk needs floating point and the model has no "
            "tile_transform. Set self.tile_transform = lightning_streaming.Uint8Normalize(mean, std) in "
            f"{model}.__init__ (mean and std per channel in [0, 1] units, e.g. from ls.channel_mean_std): each tile "
            "is then converted on its device and the float image never exists whole. Or make the DataLoader "
            "yield float images"
        )
