"""ChannelMomentsMetric: per-channel count, sum and sum of squares (float64), summed across processes."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from ..core import ChannelMoments


class ChannelMomentsMetric(Metric):
    """Running per-channel moments of an activation, as a torchmetrics
    :class:`~torchmetrics.Metric`: :meth:`update` adds a
    :class:`~lightning_streaming.ChannelMoments` (a tile's, a batch's), :meth:`compute`
    sums the three states over all processes (``dist_reduce_fx="sum"``) and returns the
    total, from which ``mean`` and ``std = sqrt(E[X^2] - mean^2)`` follow.

    Every process gets the same sums: torchmetrics gathers the states and adds them in
    rank order on each process, so anything computed from them agrees bit for bit.

    A process that could not compute its share calls :meth:`add_failure` instead of
    leaving the collective: the ``failures`` state is reduced with the sums, so every
    process learns of it in the same :meth:`compute` call, which then raises on all of
    them instead of leaving the others waiting in the next collective.

    Args:
        num_channels: channels of the activation (its dimension 1).
        **kwargs: passed to :class:`~torchmetrics.Metric` (e.g. ``process_group``).

    Example::

        metric = ChannelMomentsMetric(num_channels=16)
        for x in batches:
            metric.update(ls.channel_moments(trunk, x, 1024, "conv3"))
        print(metric.compute().std)
    """

    full_state_update = False
    count: torch.Tensor
    sum: torch.Tensor
    sum_sq: torch.Tensor
    failures: torch.Tensor

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(num_channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros(num_channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("failures", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, moments: ChannelMoments) -> None:
        """Add the moments of one more part of the activation."""
        if moments.sum.shape != self.sum.shape:
            raise ValueError(
                f"moments of {moments.sum.numel()} channels cannot be added to a metric of {self.sum.numel()} channels"
            )
        self.count += moments.count.to(self.count)
        self.sum += moments.sum.to(self.sum)
        self.sum_sq += moments.sum_sq.to(self.sum_sq)

    def add_failure(self) -> None:
        """Record that this process could not compute its part (see the class docstring)."""
        self.failures += 1

    def compute(self) -> ChannelMoments:
        """The moments summed over every update of every process.

        Raises:
            RuntimeError: on every process, when any process called :meth:`add_failure`.
        """
        if self.failures.item() > 0:
            raise RuntimeError(
                f"{int(self.failures.item())} process(es) could not compute their part of the channel moments; "
                "see the error raised on that process"
            )
        return ChannelMoments(self.count.clone(), self.sum.clone(), self.sum_sq.clone())
