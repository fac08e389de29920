"""Models for the inference tests (no tests here), importable as ``inference_models:Class``
from the tests folder (the command-line tests load them by that name)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import lightning_streaming as ls


def slide_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Tanh(),
    )  # fmt: skip


class SlideNet(ls.StreamingMixin, pl.LightningModule):
    """A small streamed classifier of uint8 slides (normalised per tile)."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None, double: bool = False,
                 num_classes: int = 3, lr: float = 0.05) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.trunk = slide_trunk()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        if mean is not None:
            dtype = torch.float64 if double else torch.float32
            self.tile_transform = ls.Uint8Normalize(mean, std, dtype=dtype)
        if double:
            self.double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class AttentionPool(nn.Module):
    """Attention pooling that exposes its weights (ls.LocationWeights)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)

    def location_weights(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features).flatten(1).softmax(dim=1).view_as(features[:, 0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features * self.location_weights(features)[:, None]).sum(dim=(2, 3))


class AttentionNet(SlideNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(1)
        self.head = nn.Sequential(AttentionPool(8), nn.Linear(8, self.hparams.num_classes))
        if self.hparams.double:
            self.double()


class OtherNet(ls.StreamingMixin, pl.LightningModule):
    """Another model class (for the refusal of a checkpoint saved from SlideNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
