"""Lazy inputs: an image that knows its shape and reads any box on demand."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor


class RegionSource(abc.ABC):
    """An input too large to hold whole (a slide level, a memory-mapped array).

    :func:`~lightning_streaming.stream` reads only the regions its tiles need, so the
    image is never materialised. Any object with ``shape``, ``dtype`` and ``read`` works;
    subclassing documents the contract.
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """``(N, C, *spatial)``."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @abc.abstractmethod
    def read(self, region: tuple[slice, ...]) -> Tensor:
        """The pixels of ``region`` (one ``slice(start, stop)`` per spatial dimension) as
        a tensor of shape ``(N, C, *region sizes)``."""


def is_region_source(value: Any) -> bool:
    return not isinstance(value, Tensor) and all(hasattr(value, a) for a in ("shape", "dtype", "read"))
