"""Streamed per-channel statistics of a layer equal those of the un-tiled activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trunks import DenseBlock, resnet_trunk, table1_network

import lightning_streaming as ls


def unstreamed_moments(trunk: nn.Module, x: torch.Tensor, layer: str) -> ls.ChannelMoments:
    captured = {}
    handle = trunk.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        trunk(x)
    handle.remove()
    return ls.ChannelMoments.of(captured["out"])


@pytest.mark.parametrize("tile", [40, 57, 1000])
@pytest.mark.parametrize("shape", [(2, 3, 95, 71), (1, 3, 130, 49)])
def test_every_conv_of_a_resnet_trunk(shape, tile):
    trunk = resnet_trunk(depth=2).double()
    x = torch.randn(shape, dtype=torch.float64)
    layers = ls.trunk_layers(trunk)
    assert layers[0] == "0" and "5.0.downsample.0" in layers and len(layers) == 10
    for layer in layers:
        try:
            streamed = ls.channel_moments(trunk, x, tile, layer)
        except ls.TileTooSmallError:
            continue  # deep layers need larger tiles; exercised with tile 1000
        expected = unstreamed_moments(trunk, x, layer)
        assert streamed.count.item() == expected.count.item()
        torch.testing.assert_close(streamed.sum, expected.sum, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(streamed.sum_sq, expected.sum_sq, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(streamed.std, expected.std, rtol=1e-10, atol=1e-12)


def test_layers_inside_concatenation_blocks_and_combined_batches():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DenseBlock(), nn.Conv2d(6, 3, 3)).double()
    x1, x2 = torch.randn(2, 3, 51, 38, dtype=torch.float64), torch.randn(1, 3, 33, 60, dtype=torch.float64)
    for layer in ls.trunk_layers(trunk):
        streamed = ls.channel_moments(trunk, x1, 17, layer) + ls.channel_moments(trunk, x2, 23, layer)
        expected = unstreamed_moments(trunk, x1, layer) + unstreamed_moments(trunk, x2, layer)
        torch.testing.assert_close(streamed.sum_sq, expected.sum_sq, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(streamed.mean, expected.mean, rtol=1e-10, atol=1e-12)


def test_prefix_shares_the_trunks_modules_and_bad_layer_names_are_explained():
    trunk = table1_network().double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    before = ls.channel_moments(trunk, x, 16, "2").std
    with torch.no_grad():
        trunk[2].weight.mul_(2)
        trunk[2].bias.mul_(2)
    torch.testing.assert_close(ls.channel_moments(trunk, x, 16, "2").std, 2 * before)
    with pytest.raises(ValueError, match="layer 'nope'.*layers are: '0', '1', '2'"):
        ls.channel_moments(trunk, x, 16, "nope")
