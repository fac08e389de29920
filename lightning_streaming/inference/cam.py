"""Class activation maps (Grad-CAM) from the trunk's output, and per-location weights a head
exposes (e.g. attention pooling)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["LocationWeights", "find_location_weights", "grad_cam"]


@runtime_checkable
class LocationWeights(Protocol):
    """A head (or the first module of a sequential head) that says how much each location of
    the trunk's output counts, e.g. the attention of attention-based pooling.

    Example::

        class AttentionPool(nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.score = nn.Conv2d(channels, 1, 1)

            def location_weights(self, features):           # (N, C, h, w) -> (N, h, w)
                return self.score(features).flatten(1).softmax(dim=1).view_as(features[:, 0])

            def forward(self, features):
                return (features * self.location_weights(features)[:, None]).sum(dim=(2, 3))
    """

    def location_weights(self, features: Tensor) -> Tensor:
        """``(N, h, w)`` weights of the locations of ``features`` ``(N, C, h, w)``."""
        ...


def find_location_weights(head: nn.Module) -> LocationWeights | None:
    """The head itself, or the first module of a sequential head, when it has ``location_weights``."""
    if isinstance(head, LocationWeights):
        return head
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], LocationWeights):
        return head[0]
    return None


def grad_cam(features: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM: ``relu(sum_k alpha_k * A_k)`` with ``alpha_k`` the spatial mean of the score's
    gradient with respect to feature map ``A_k`` (Selvaraju et al., 2017).

    Args:
        features: the trunk's output ``(N, K, *spatial)``.
        gradient: the score's gradient with respect to it, same shape.

    Returns:
        ``(N, *spatial)``.
    """
    if features.shape != gradient.shape or features.dim() < 3:
        raise ValueError(
            f"grad_cam needs features and their gradient of one shape (N, K, *spatial), got {tuple(features.shape)} "
            f"and {tuple(gradient.shape)}"
        )
    spatial = tuple(range(2, features.dim()))
    weights = gradient.mean(dim=spatial, keepdim=True)
    return torch.relu((weights * features).sum(dim=1))
