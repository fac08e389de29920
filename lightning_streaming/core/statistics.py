"""Per-channel statistics of any layer of a trunk, gathered while streaming.

Tiles are planned so that they partition the *layer's* output (its receptive field, not
the trunk's), and on each tile the trunk runs only until that layer has produced its
output (a forward hook stops it there). So every pixel of the layer's output is counted
once and none comes from a halo or from padding at a tile border: the sums equal those of
the un-tiled activation up to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .graph import TrunkGeometry
from .plan import normalise_tile_size, plan_tiles
from .source import RegionSource
from .stream import _crop_index, _geometry_for, _TileRunner, _trunk_device
from .tracing import expected_spatial_dims, hooks_suspended


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
    calls = _call_order(module)
    return [name for name in dict.fromkeys(calls) if name and isinstance(module.get_submodule(name), types)]


def _call_order(module: nn.Module) -> list[str]:
    """Submodule names in the order a forward calls them (on a fake input: nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracing import default_channels

    names = {id(m): name for name, m in module.named_modules()}
    calls: list[str] = []
    spatial = expected_spatial_dims(module) or 2
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    with hooks_suspended(module):
        handles = [m.register_forward_pre_hook(lambda m, a: calls.append(names[id(m)])) for m in module.modules()]
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                module(torch.empty((1, default_channels(module)) + (512,) * spatial, dtype=dtype))
        finally:
            for handle in handles:
                handle.remove()
    return calls


class _LayerReached(Exception):
    """Raised by the forward hook on the measured layer: the rest of the trunk is not needed."""

    def __init__(self, output: Tensor):
        super().__init__()
        self.output = output


def layer_geometry(geometry: TrunkGeometry, layer: str, module: nn.Module) -> TrunkGeometry:
    """The trunk's geometry up to (and with its output at) the output of submodule ``layer``."""
    nodes = geometry.module_nodes.get(layer, [])
    if len(nodes) != 1:
        known = ", ".join(repr(name) for name in dict.fromkeys(geometry.calls) if name)
        raise ValueError(
            f"layer {layer!r} must be a submodule the trunk calls exactly once on a feature map "
            f"(it is called {len(nodes)} times); the trunk's layers are: {known}"
        )
    return geometry.truncated(nodes[0])


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
    geometry = layer_geometry(_geometry_for(module, input.shape), layer, module)
    spatial = tuple(int(s) for s in input.shape[2:])
    plan = plan_tiles(geometry, spatial, normalise_tile_size(tile_size, len(spatial)))
    fallback = input.device if isinstance(input, Tensor) else torch.device("cpu")
    device = torch.device(tile_device) if tile_device is not None else _trunk_device(module, fallback)
    runner = _TileRunner(module, plan, [], device, transform)

    def stop(m: nn.Module, args: object, output: Tensor) -> None:
        raise _LayerReached(output)

    total = None
    handle = module.get_submodule(layer).register_forward_hook(stop)
    try:
        for tile in runner.tiles:
            region = runner.read(input, tile)
            try:
                module(region if transform is None else transform(region))
            except _LayerReached as reached:
                output = reached.output
            else:
                raise RuntimeError(f"the trunk did not call layer {layer!r} on a tile")
            moments = ChannelMoments.of(output[_crop_index(tile, 0)])
            total = moments if total is None else total + moments
    finally:
        handle.remove()
    assert total is not None
    return total
