"""Everything the core refuses, and that each message names the module and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trunks import table1_network

import lightning_streaming as ls

X = torch.randn(1, 3, 32, 32)


def refused(trunk: nn.Module, *patterns: str, x: torch.Tensor = X) -> str:
    with pytest.raises(ls.NotLocalError) as caught:
        ls.stream(trunk, x, 16)
    message = str(caught.value)
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_batchnorm_in_training_mode_names_module_and_fix():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    refused(trunk, "module '1' (BatchNorm2d)", "eval", "LSUV")
    trunk.eval()
    ls.stream(trunk, X, 16)  # eval mode with running statistics is local


def test_batchnorm_without_running_stats_is_refused_even_in_eval():
    refused(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)).eval(), "BatchNorm2d")


@pytest.mark.parametrize(
    "layer, words",
    [
        (nn.GroupNorm(1, 3), "GroupNorm"),
        (nn.InstanceNorm2d(3), "InstanceNorm"),
        (nn.AdaptiveAvgPool2d(1), "adaptive (global) pooling"),
        (nn.AdaptiveMaxPool2d((4, 4)), "adaptive (global) pooling"),
        (nn.Dropout(0.2), "Dropout in training mode"),
        (nn.Dropout2d(0.2), "random"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "circular"),
        (nn.CircularPad2d(1), "circular"),
        (nn.Upsample(scale_factor=2), "Upsample has no geometry rule"),
        (nn.Flatten(), "flattening"),
        (nn.MaxPool2d(2, return_indices=True), "return_indices"),
        (nn.LayerNorm([3, 32, 32]), "spatial"),
        (nn.Linear(32, 32), "last dimension, which is spatial"),
        (nn.Softmax(dim=2), "spatial"),
        (nn.RReLU(), "random"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_refused_layers(layer, words):
    message = refused(nn.Sequential(nn.Conv2d(3, 3, 1), layer), words)
    assert f"module '1' ({type(layer).__name__})" in message


def test_dropout_in_eval_mode_is_accepted():
    ls.stream(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)).eval(), X, 16)


def test_attention_and_unknown_modules():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(3, 1, batch_first=True)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            return self.attention(tokens, tokens, tokens)[0]

    refused(Attention(), "flatten")

    class OnlyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(32, 1)

        def forward(self, x):
            return self.attention(x, x, x)[0]

    refused(OnlyAttention(), "module 'attention' (MultiheadAttention)", "attention")


def test_operations_that_read_shape_or_reduce_or_vary_with_position():
    class ReadsShape(nn.Module):
        def forward(self, x):
            return x * x.shape[-1]

    message = refused(ReadsShape(), "shape", "differs between tiles")
    assert "test_core_refusals.py" in message and "return x * x.shape[-1]" in message  # points at user code

    class GlobalMean(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=(2, 3), keepdim=True)

    refused(GlobalMean(), ".mean()", "head")

    class PositionEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.position = nn.Parameter(torch.zeros(1, 3, 32, 32))

        def forward(self, x):
            return x + self.position

    refused(PositionEmbedding(), "varies along spatial dimension", "absolute position")

    class ChannelScale(nn.Module):  # a per-channel constant is fine
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, 1, 1))

        def forward(self, x):
            return x * self.scale.view(1, 3, 1, 1)

    ls.stream(ChannelScale(), X, 16)


def test_untraceable_and_multi_argument_trunks():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    refused(DataDependent(), "could not trace", "control flow")

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    refused(TwoInputs(), "more than one required argument")


def test_branches_of_different_resolution_are_refused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.strided = nn.Conv1d(1, 1, 1, stride=2)
            self.valid = nn.Conv1d(1, 1, 5)

        def forward(self, x):  # both give length 4 for length 8, but on different grids
            return self.strided(x) + self.valid(x)

    refused(Mixed(), "different resolutions", x=torch.randn(1, 1, 8))


def test_custom_module_can_be_registered():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.special.expit(x)  # no rule for torch.special.expit

    refused(nn.Sequential(Swish()), "expit")
    ls.register_module_rule(Swish, ls.pixelwise)
    try:
        ls.verify(nn.Sequential(nn.Conv2d(3, 2, 3), Swish()), (1, 3, 20, 20), 9)
    finally:
        from lightning_streaming.core import rules

        rules._MODULE_RULES.pop(Swish)


def test_tile_too_small_states_the_minimum_and_the_minimum_works():
    trunk = table1_network()
    with pytest.raises(ls.TileTooSmallError, match=r"minimum usable tile for this 32x32 input is \(7, 7\)") as caught:
        ls.stream(trunk, X, 6)
    assert caught.value.minimum_tile == (7, 7)
    ls.verify(trunk, (1, 3, 32, 32), 7)
    with pytest.raises(ls.TileTooSmallError, match=r"\(7, 7\)"):
        ls.stream(trunk, X, (6, 40))


@pytest.mark.parametrize("tile", [0, -3, (16,), (16, 16, 16), 2.5, "auto"])
def test_bad_tile_sizes(tile):
    with pytest.raises(ValueError, match="tile_size must be"):
        ls.stream(table1_network(), X, tile)


def test_mismatched_dtype_device_and_shapes():
    trunk = table1_network()
    with pytest.raises(TypeError, match="dtype torch.float64 but the trunk's parameters have dtype torch.float32"):
        ls.stream(trunk, X.double(), 16)
    with pytest.raises(TypeError, match="uint8.*transform="):
        ls.stream(trunk, (X * 100).to(torch.uint8), 16)
    with pytest.raises(ValueError, match=r"batched input.*unsqueeze"):
        ls.stream(trunk, X[0, 0], 16)
    with pytest.raises(TypeError, match="needs a tensor"):
        ls.stream(trunk, X.numpy(), 16)
    with pytest.raises(ValueError, match="keep_graphs"):
        ls.stream(trunk, X, 16, keep_graphs=-1)
    on_meta = table1_network().to("meta")
    with pytest.raises(ValueError, match="input is on cpu but the trunk's parameters are on meta.*tile_device="):
        ls.stream(on_meta, X, 16)


def test_image_too_small_for_the_trunk():
    trunk = nn.Sequential(nn.Conv2d(3, 3, 5), nn.MaxPool2d(4))
    with pytest.raises(ValueError, match="too small for the trunk"):
        ls.stream(trunk, torch.randn(1, 3, 6, 30), 16)
