"""Per-channel statistics of any layer of a trunk, gathered while streaming.

The trunk is cut after the layer (a torch.fx prefix sharing the trunk's modules) and the
prefix is streamed: its tiles partition the layer's output exactly, so every pixel is
counted once and none comes from a halo or from padding at a tile border. The sums equal
those of the un-tiled activation up to float64 rounding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .graph import _fingerprint, _hooks_suspended, _Tracer
from .source import RegionSource
from .stream import _TileRunner, _trunk_device, tile_plan


@dataclass
class ChannelMoments:
    """Count, sum and sum of squares per channel (float64), as running sums.

    Add two to combine batches; reduce the three sums across processes before using
    :attr:`mean` and :attr:`std` (Var = E[X^2] - mean^2).
    """

    count: Tensor  # scalar: values per channel
    sum: Tensor  # (C,)
    sum_sq: Tensor  # (C,)

    def __add__(self, other: "ChannelMoments") -> "ChannelMoments":
        return ChannelMoments(self.count + other.count, self.sum + other.sum, self.sum_sq + other.sum_sq)

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count

    @property
    def var(self) -> Tensor:
        return (self.sum_sq / self.count - self.mean.square()).clamp_min(0)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    @classmethod
    def of(cls, activation: Tensor) -> "ChannelMoments":
        """The moments of a whole activation (N, C, *spatial)."""
        values = activation.detach().to(torch.float64).transpose(0, 1).reshape(activation.shape[1], -1)
        count = torch.tensor(float(values.shape[1]), dtype=torch.float64, device=values.device)
        return cls(count, values.sum(1), values.square().sum(1))


def trunk_layers(module: nn.Module, types: tuple[type, ...] = (nn.modules.conv._ConvNd,)) -> list[str]:
    """Qualified names of the trunk's submodules of ``types``, in the order they run."""
    with _hooks_suspended(module):
        graph = _Tracer().trace(module)
    names = [n.target for n in graph.nodes if n.op == "call_module"]
    return [name for name in dict.fromkeys(names) if isinstance(module.get_submodule(name), types)]


_PREFIXES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def trunk_prefix(module: nn.Module, layer: str) -> fx.GraphModule:
    """The trunk up to and including the submodule ``layer``, sharing its modules."""
    key = _fingerprint(module, 0)
    cache = _PREFIXES.setdefault(module, {})
    if cache.get("key") != key:
        cache.clear()
        cache["key"] = key
    if layer not in cache:
        with _hooks_suspended(module):
            graph = _Tracer().trace(module)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
        if len(calls) != 1:
            known = ", ".join(repr(n) for n in trunk_layers(module, (nn.Module,)))
            raise ValueError(
                f"layer {layer!r} must be a submodule the trunk calls exactly once "
                f"(it is called {len(calls)} times); the trunk's layers are: {known}"
            )
        prefix = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node.op == "output":
                break
            copies[node] = prefix.node_copy(node, lambda n: copies[n])
            if node is calls[0]:
                break
        prefix.output(copies[calls[0]])
        cut = fx.GraphModule(module, prefix)
        cut.graph.eliminate_dead_code()  # branches computed before the layer but not feeding it
        cut.recompile()
        cache[layer] = cut
    return cache[layer]


@torch.no_grad()
def channel_moments(
    module: nn.Module,
    input: Tensor | RegionSource,
    tile_size: int | Sequence[int],
    layer: str,
    *,
    tile_device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> ChannelMoments:
    """Per-channel count, sum and sum of squares of ``layer``'s output on ``input``,
    computed tile by tile (the layer's full output is never held).

    Example::

        moments = channel_moments(trunk, images, tile_size=512, layer="layer1.0.conv1")
        print(moments.std)
    """
    prefix = trunk_prefix(module, layer)
    device = torch.device(tile_device) if tile_device is not None else _trunk_device(module, input.device if isinstance(input, Tensor) else torch.device("cpu"))
    runner = _TileRunner(prefix, tile_plan(prefix, input.shape, tile_size), [], device, transform)
    total = None
    for tile in runner.tiles:
        moments = ChannelMoments.of(runner.run(runner.read(input, tile), tile))
        total = moments if total is None else total + moments
    return total
