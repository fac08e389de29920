"""Samplers that know the epoch and the process: DistributedSampler-compatible, optionally
class-balanced, yielding ``(index, epoch)`` so augmentation is seeded per sample and epoch."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["ClassBalancedSampler", "EpochSampler"]


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


class EpochSampler(DistributedSampler):
    """PyTorch's :class:`~torch.utils.data.DistributedSampler` (each process a disjoint share,
    reshuffled per epoch with a seed shared by all processes) that yields
    ``(index, epoch)``: a :class:`SlideDataset` seeds each sample's augmentation from them,
    so results do not depend on the number of workers and stay reproducible with
    persistent workers. Lightning calls ``set_epoch`` and leaves it in place under DDP.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas, rank: the processes; default from ``torch.distributed``, else 1 and 0.
        shuffle, seed, drop_last: as for ``DistributedSampler``.

    Example::

        sampler = ls.EpochSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
    """

    def __init__(
        self,
        dataset: Sequence,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((int(i), epoch) for i in super().__iter__())


class ClassBalancedSampler(DistributedSampler):
    """Draws samples so that every class is equally likely (weights 1 / class count, with
    replacement), the same draw in every process (seeded by ``seed`` and the epoch), then
    gives each process a disjoint share: class-balanced sampling that works under DDP.

    Yields ``(index, epoch)`` like :class:`EpochSampler`.

    Args:
        labels: the class index of every sample.
        num_samples: samples drawn per epoch over all processes (default: the dataset
            size).
        num_replicas, rank: the processes; default from ``torch.distributed``, else 1 and 0.
        seed: the seed shared by all processes.

    Example::

        sampler = ls.ClassBalancedSampler(dataset.labels, num_replicas=2, rank=0)
    """

    def __init__(
        self,
        labels: Sequence[int],
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(list(labels), dtype=torch.int64)
        if labels.numel() == 0 or labels.min() < 0:
            raise ValueError("ClassBalancedSampler needs at least one non-negative class label")
        draws = int(num_samples) if num_samples is not None else labels.numel()
        num_replicas, rank = _world(num_replicas, rank)
        dataset: Sequence[int] = range(draws)  # only its length matters
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        counts = torch.bincount(labels).double()
        self.weights = 1.0 / counts[labels]
        self.draws = draws

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chosen = torch.multinomial(self.weights, self.draws, replacement=True, generator=generator).tolist()
        chosen += chosen[: self.total_size - len(chosen)]  # pad so every process gets as many
        epoch = self.epoch
        return ((int(i), epoch) for i in chosen[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self.draws / self.num_replicas)
