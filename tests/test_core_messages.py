"""A user's common mistakes with the input get a message that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trunks import table1_network

import lightning_streaming as ls


def test_unbatched_image_is_told_to_add_a_batch_dimension():
    with pytest.raises(ValueError, match=r"work on 2 spatial dimension.*\(N, C, H, W\).*\(3, 64, 48\).*unsqueeze\(0\)"):
        ls.stream(table1_network(), torch.randn(3, 64, 48), 32)


def test_channels_last_image_is_told_to_permute():
    with pytest.raises(ValueError, match=r"expects 3 input channels but receives 64.*channels-last.*permute\(0, 3, 1, 2\)"):
        ls.stream(table1_network(), torch.randn(1, 64, 48, 3), 32)


def test_wrong_channel_count_names_the_layer():
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\).* expects 3 input channels but receives 4"):
        ls.stream(table1_network(), torch.randn(1, 4, 40, 40), 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_tiles_on_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"CUDA is not available.*tile_device='cpu'"):
        ls.stream(table1_network(), torch.randn(1, 3, 40, 40), 32, tile_device="cuda")


def test_an_image_too_small_for_the_trunk_says_the_smallest_it_accepts():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"length 1 .*empty after module '0' \(Conv2d\).*smallest length it accepts is 8"):
        ls.stream(trunk, torch.randn(1, 3, 1, 1), 32)


@pytest.mark.parametrize("keep_graphs", [True, -1, 1.5])
def test_keep_graphs_must_be_a_count(keep_graphs):
    with pytest.raises(ValueError, match="keep_graphs must be a non-negative int"):
        ls.stream(table1_network(), torch.randn(1, 3, 40, 40), 32, keep_graphs=keep_graphs)
