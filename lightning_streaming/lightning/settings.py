"""How a streaming strategy runs the trunk: tile size, kept graphs, where the input lives."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Literal, Sequence, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor, nn

from ..core import stream
from .auto_tile import auto_tile_size, parse_bytes

log = logging.getLogger(__name__)

TileSize = Union[int, Sequence[int]]
DEFAULT_TILE_SIZE = 1024
_MAX_AUTO_CACHE = 64


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
                "tile_size='auto' needs memory_budget: the bytes one tile's working set may use, e.g. "
                "memory_budget='4GiB'. Or give tile_size as an int"
            )
        if memory_budget is not None and tile_size != "auto":
            raise ValueError(f"memory_budget is only used with tile_size='auto', but tile_size={tile_size!r}")
        self.tile_size = tuple(tile_size) if isinstance(tile_size, list) else tile_size
        self.keep_graphs = keep_graphs
        self.memory_budget = parse_bytes(memory_budget) if memory_budget is not None else None
        self.input_on_host = bool(input_on_host)
        self._auto: OrderedDict[tuple, int] = OrderedDict()

    def __repr__(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget is not None else ""
        return (
            f"StreamingSettings(tile_size={self.tile_size!r}, keep_graphs={self.keep_graphs}{budget}, "
            f"input_on_host={self.input_on_host})"
        )

    def __getstate__(self) -> dict:
        # The 'auto' cache is keyed by id(trunk), which means nothing in another process.
        return {**self.__dict__, "_auto": OrderedDict()}

    def resolve_tile_size(
        self, trunk: nn.Module, x: Tensor, device: torch.device, default: TileSize | None = None
    ) -> TileSize:
        """The tile size for streaming ``trunk`` over ``x``: the strategy's, else the model's
        ``default``, else :data:`DEFAULT_TILE_SIZE`; 'auto' is solved for ``x``'s shape."""
        if self.tile_size is None:
            return default if default is not None else DEFAULT_TILE_SIZE
        if self.tile_size != "auto":
            return self.tile_size
        autocast = torch.is_autocast_enabled(device.type)
        activation_dtype = torch.get_autocast_dtype(device.type) if autocast else None
        requires_grad = getattr(x, "requires_grad", False)  # a RegionSource has no gradient
        key = (id(trunk), tuple(x.shape), x.dtype, activation_dtype, requires_grad)
        if key not in self._auto:
            if len(self._auto) >= _MAX_AUTO_CACHE:
                self._auto.popitem(last=False)
            assert self.memory_budget is not None
            tile = auto_tile_size(
                trunk,
                x.shape,
                self.memory_budget,
                input_dtype=x.dtype,
                activation_dtype=activation_dtype,
                input_grad=requires_grad,
            )
            self._auto[key] = tile
            if getattr(rank_zero_only, "rank", 0) == 0:  # set by Lightning once it knows the process's rank
                log.info(
                    "tile_size='auto': %d px tiles for input %s (memory budget %.1f MiB per tile)",
                    tile,
                    tuple(x.shape),
                    self.memory_budget / 2**20,
                )
        return self._auto[key]

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
        tile_size = self.resolve_tile_size(trunk, x, device, default_tile_size)
        # Only a host-resident input needs tile_device: otherwise the core checks that input and trunk agree.
        tile_device = device if not isinstance(x, Tensor) or x.device != device else None
        # None leaves keep_graphs to stream(), whose default the core chooses for its memory model.
        options = {} if self.keep_graphs is None else {"keep_graphs": self.keep_graphs}
        return stream(trunk, x, tile_size, tile_device=tile_device, transform=transform, **options)

    def move_batch(self, batch: Any, move: Callable[[Tensor], Tensor]) -> Any:
        """``batch`` with ``move`` applied to its tensors, except, with ``input_on_host``,
        image-shaped ones (3 or more dimensions: ``(N, C, *spatial)``), which stay where the
        DataLoader put them and go to the device tile by tile."""
        if not self.input_on_host:
            return apply_to_collection(batch, Tensor, move)
        return apply_to_collection(batch, Tensor, lambda t: t if t.dim() >= 3 else move(t))
