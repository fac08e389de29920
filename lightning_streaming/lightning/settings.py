"""How a streaming strategy runs the trunk: tile size, kept graphs, where the input lives."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from ..core import StreamPlan, TileTooSmallError, parse_bytes, stream, stream_plan, tile_plan

TileSize = Union[int, Sequence[int]]
DEFAULT_TILE_SIZE = 1024


def _check_tile_size(tile_size: Any, argument: str) -> None:
    if tile_size is None or tile_size == "auto":
        return
    if isinstance(tile_size, int) and not isinstance(tile_size, bool) and tile_size > 0:
        return
    if (
        isinstance(tile_size, (tuple, list))
        and tile_size
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in tile_size)
    ):
        return
    raise ValueError(
        f"{argument} must be a positive int, a tuple of positive ints (one per spatial dimension), 'auto' or None; "
        f"got {tile_size!r}"
    )


class StreamingSettings:
    """The streaming part of a strategy's configuration, shared by
    :class:`~lightning_streaming.StreamingStrategy` and
    :class:`~lightning_streaming.StreamingDDPStrategy` (see them for the arguments).

    A strategy is a streaming one when its ``streaming`` attribute is an instance of this
    class; :class:`~lightning_streaming.StreamingMixin` looks for it.
    """

    def __init__(
        self,
        tile_size: TileSize | Literal["auto"] | None = None,
        keep_graphs: int | None = None,
        memory_budget: int | str | None = None,
        input_on_host: bool = False,
    ) -> None:
        _check_tile_size(tile_size, "tile_size")
        if keep_graphs is not None and (
            not isinstance(keep_graphs, int) or isinstance(keep_graphs, bool) or keep_graphs < 0
        ):
            raise ValueError(
                f"keep_graphs must be None (stream()'s default) or a non-negative int (the number of tiles whose "
                f"graphs are kept), got {keep_graphs!r}"
            )
        if tile_size == "auto" and memory_budget is None:
            raise ValueError(
                "tile_size='auto' needs memory_budget: the memory the streamed trunk may add to a step, e.g. "
                "memory_budget='4GiB'. Or give tile_size as an int"
            )
        self.tile_size = tuple(tile_size) if isinstance(tile_size, list) else tile_size
        self.keep_graphs = keep_graphs
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else None
        self.input_on_host = bool(input_on_host)

    def __repr__(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget is not None else ""
        return (
            f"StreamingSettings(tile_size={self.tile_size!r}, keep_graphs={self.keep_graphs}{budget}, "
            f"input_on_host={self.input_on_host})"
        )

    @property
    def planned(self) -> bool:
        """Whether the budget planner chooses the tile size (``"auto"``, or a budget without one)."""
        return self.memory_budget is not None and self.tile_size in (None, "auto")

    def plan(self, trunk: nn.Module, x: Tensor, device: torch.device, default: TileSize | None = None) -> StreamPlan:
        """The :class:`~lightning_streaming.StreamPlan` that :meth:`stream` follows for ``x``
        now (grad mode and autocast as they are): tile size, kept graphs, tile batching
        and, with a memory budget, the predicted memory and time."""
        requires_grad = bool(getattr(x, "requires_grad", False))  # a RegionSource has no gradient
        grad = torch.is_grad_enabled() and (requires_grad or any(p.requires_grad for p in trunk.parameters()))
        autocast = torch.is_autocast_enabled(device.type)
        return stream_plan(
            trunk, tuple(x.shape), self._tile_size(default), **self._options(), grad=grad, input_grad=requires_grad,
            input_dtype=x.dtype, activation_dtype=torch.get_autocast_dtype(device.type) if autocast else None,
            device=device,
        )  # fmt: skip

    def resolve_tile_size(
        self, trunk: nn.Module, x: Tensor, device: torch.device, default: TileSize | None = None
    ) -> TileSize:
        """The tile size for streaming ``trunk`` over ``x``: the strategy's, else the model's
        ``default``, else :data:`DEFAULT_TILE_SIZE`; with a memory budget and no explicit
        size, the budget planner's choice for ``x``'s shape."""
        if not self.planned:
            return self._tile_size(default)  # type: ignore[return-value]
        plan = self.plan(trunk, x, device)
        if plan.split is None:
            return plan.tile_size
        try:  # the plan streams only the first children: its tile may not hold the whole trunk's receptive field
            tile_plan(trunk, tuple(x.shape), plan.tile_size)
            return plan.tile_size
        except TileTooSmallError as error:
            return error.minimum_tile

    def _tile_size(self, default: TileSize | None) -> TileSize | str:
        if self.planned:
            return "auto"
        if self.tile_size is None:
            return default if default is not None else DEFAULT_TILE_SIZE
        return self.tile_size

    def _options(self) -> dict[str, Any]:
        # None leaves keep_graphs to stream(): its default, or the planner's choice within a budget.
        options: dict[str, Any] = {} if self.keep_graphs is None else {"keep_graphs": self.keep_graphs}
        if self.memory_budget is not None:
            options["memory_budget"] = self.memory_budget
        return options

    def stream(
        self,
        trunk: nn.Module,
        x: Tensor,
        device: torch.device,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        default_tile_size: TileSize | None = None,
    ) -> Tensor:
        """``trunk(transform(x))`` computed tile by tile, tiles running on ``device``."""
        # Only a host-resident input needs tile_device: otherwise the core checks that input and trunk agree.
        tile_device = device if not isinstance(x, Tensor) or x.device != device else None
        tile_size = self._tile_size(default_tile_size)
        return stream(trunk, x, tile_size, tile_device=tile_device, transform=transform, **self._options())

    def move_batch(self, batch: Any, move: Callable[[Tensor], Tensor]) -> Any:
        """``batch`` with ``move`` applied to its tensors, except, with ``input_on_host``,
        image-shaped ones (3 or more dimensions: ``(N, C, *spatial)``), which stay where the
        DataLoader put them and go to the device tile by tile."""
        if not self.input_on_host:
            return apply_to_collection(batch, Tensor, move)
        return apply_to_collection(batch, Tensor, lambda t: t if t.dim() >= 3 else move(t))
