"""Tile plans (balanced, aligned, a partition of the output) and the memory bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trunks import resnet50_trunk, resnet_trunk, table1_network

import lightning_streaming as ls
from lightning_streaming.core.graph import geometry_of
from lightning_streaming.core.plan import _DimensionPlanner


def vgg_like() -> nn.Sequential:
    """The first four blocks of the paper's Table III network."""
    layers, channels = [], 3
    for width in (32, 64, 128, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    "trunk, size, tile",
    [(table1_network(), 2048, 1024), (vgg_like(), 2048, 1024), (vgg_like(), 8191, 1000), (resnet50_trunk(), 4000, 700)],
    ids=["table1", "vgg", "vgg-odd", "resnet50"],
)
def test_plans_are_balanced_aligned_partitions_with_fewest_tiles(trunk, size, tile):
    geometry = geometry_of(trunk, 2)
    plan = ls.tile_plan(trunk, (1, 3, size, size - 77), tile)
    for dim, segments in enumerate(plan.segments):
        # The exact outputs partition the output, in order.
        assert segments[0].out_start == 0 and segments[-1].out_stop == plan.output_shape[dim]
        assert all(a.out_stop == b.out_start for a, b in zip(segments, segments[1:]))
        # Regions fit the tile, start on the trunk's grid, and are nearly equal.
        assert all(s.size <= tile and s.start % geometry.alignment[dim] == 0 for s in segments)
        sizes = [s.size for s in segments]
        assert max(sizes) - min(sizes) <= len(segments) * geometry.alignment[dim] + 2 * geometry.alignment[dim]
        # As few tiles as the tile size allows: greedy covering is optimal, and it agrees.
        planner = _DimensionPlanner(geometry, dim, plan.input_shape[dim])
        assert len(planner.greedy(tile)) == len(segments)


def test_tile_larger_than_image_is_a_single_tile_covering_the_image():
    plan = ls.tile_plan(table1_network(), (2, 3, 100, 37), 4096)
    assert len(plan) == 1 and plan.largest_region == (100, 37)


def test_plans_are_cached_per_shape_and_tile():
    trunk = table1_network()
    assert ls.tile_plan(trunk, (1, 3, 300, 200), 64) is ls.tile_plan(trunk, (1, 3, 300, 200), 64)
    assert ls.tile_plan(trunk, (1, 3, 300, 200), 64) is not ls.tile_plan(trunk, (1, 3, 300, 201), 64)


def test_geometry_is_reanalysed_when_modes_or_modules_change():
    trunk = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)).eval()
    ls.tile_plan(trunk, (1, 3, 40, 40), 16)
    trunk.train()
    with pytest.raises(ls.NotLocalError):
        ls.tile_plan(trunk, (1, 3, 40, 40), 16)
    trunk.eval()
    trunk[0] = nn.Conv2d(3, 3, 9)
    assert ls.tile_plan(trunk, (1, 3, 40, 40), 16).output_shape == (32, 32)


class LargestTensor:
    """Records the largest activation any module of the trunk produces, and the largest
    tensor autograd saves for backward, while active."""

    def __init__(self, trunk: nn.Module):
        self.trunk, self.activation, self.saved = trunk, 0, 0

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.trunk.modules()]
        self.saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.saved_hooks.__enter__()
        return self

    def _hook(self, module, inputs, output):
        # Hooks also run once in the trunk's analysis, on fake tensors of symbolic size: not a real activation.
        if module is not self.trunk and isinstance(output.numel(), int):
            self.activation = max(self.activation, output.numel())

    def _pack(self, tensor):
        self.saved = max(self.saved, tensor.numel())
        return tensor

    def __exit__(self, *exc):
        self.saved_hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("keep_graphs", [0, 1])
def test_tile_not_image_bounds_every_activation(keep_graphs):
    trunk = resnet_trunk(depth=2)
    tile = 128
    largest = {}
    for size in (160, 320, 640):
        x = torch.randn(2, 3, size, size)
        with LargestTensor(trunk) as streamed:
            ls.stream(trunk, x, tile, keep_graphs=keep_graphs).sum().backward()
        with LargestTensor(trunk) as conventional:
            trunk(x).sum().backward()
        largest[size] = (streamed.activation, streamed.saved, conventional.activation)
        # The widest layer (8 channels at stride 2) on one tile bounds everything the trunk computes
        # or saves; the input itself is the user's tensor and is saved by reference.
        bound = 2 * 8 * (tile // 2 + 1) ** 2
        assert streamed.activation <= bound
        assert streamed.saved <= max(bound, x.numel())
    # Conventional memory grows with the image, streamed does not.
    assert largest[640][0] == largest[320][0] == largest[160][0] or largest[640][0] <= largest[160][0] * 1.1
    assert largest[640][2] >= 15 * largest[160][2]


def test_unet_memory_is_bounded_by_a_tile_plus_input_and_output():
    """A U-Net's output has the input's resolution: streamed, no activation but the output
    (and the input) grows with the image; conventionally every level does."""
    import families as fam

    trunk = fam.UNet(inp=3, classes=2, width=4, depth=2).eval()
    tile = 64
    for size in (128, 256):
        x = torch.randn(1, 3, size, size)
        with LargestTensor(trunk) as streamed:
            out = ls.stream(trunk, x, tile, keep_graphs=0)
            out.sum().backward()
        with LargestTensor(trunk) as conventional:
            trunk(x).sum().backward()
        widest = 2 * 4 * tile**2  # two 4-channel maps at full resolution inside one tile (the skip concatenation)
        # The root module's output (the streamed output itself) is excluded by LargestTensor.
        assert streamed.activation <= widest, (size, streamed.activation)
        assert streamed.saved <= max(widest, x.numel()), (size, streamed.saved)
        assert conventional.activation >= 4 * size**2  # conventional activations grow with the image
