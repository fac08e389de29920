"""The web service tests' real model: a small streaming classifier in plain PyTorch (no
Lightning to import, so a worker starts in a few seconds), seeded, untrained."""

from __future__ import annotations

import torch
from torch import nn

import lightning_streaming as ls


class TinyClassifier(ls.StreamingMixin, nn.Module):
    """Four strided convolutions (the streamed trunk), global max pooling and a linear head."""

    def __init__(self, mean: list[float], std: list[float], classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, classes))
        self.tile_transform = ls.Uint8Normalize(mean, std)
