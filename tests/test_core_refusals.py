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
        (nn.AdaptiveAvgPool2d(1), "global pooling"),
        (nn.AdaptiveMaxPool2d((4, 4)), "adaptive (global) pooling"),
        (nn.Dropout(0.2), "draws random numbers"),
        (nn.Dropout2d(0.2), "random"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "circular"),
        (nn.CircularPad2d(1), "circular"),
        (nn.Upsample(size=(64, 64)), "absolute size"),
        (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), "align_corners=True"),
        (nn.Upsample(scale_factor=1.5), "not an integer"),
        (nn.Flatten(), "flattening"),
        (nn.MaxPool2d(2, return_indices=True), "return_indices"),
        (nn.LayerNorm([3, 32, 32]), "spatial"),
        (nn.Linear(32, 32), "matrix product over spatial positions"),
        (nn.Softmax(dim=2), "spatial"),
        (nn.RReLU(), "random"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_refused_layers(layer, words):
    message = refused(nn.Sequential(nn.Conv2d(3, 3, 1), layer), words)
    assert f"module '1' ({type(layer).__name__})" in message
    assert "test_core_refusals.py" in message  # the line that called the trunk


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

    refused(Attention(), "module 'attention' (MultiheadAttention)", "every position with every other")

    class ScaledDotProduct(nn.Module):  # attention written with the fused function, and back to a feature map
        def forward(self, x):
            n, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
            return out.transpose(1, 2).reshape(n, c, h, w)

    refused(ScaledDotProduct(), "every position with every other", "scaled_dot_product_attention")


def test_operations_that_read_shape_or_reduce_or_vary_with_position():
    class ReadsShape(nn.Module):
        def forward(self, x):
            return x * x.shape[-1]

    message = refused(ReadsShape(), "spatial size", "differs between tiles")
    assert "test_core_refusals.py" in message and "return x * x.shape[-1]" in message  # points at user code

    class GlobalMean(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=(2, 3), keepdim=True)

    refused(GlobalMean(), "aten.mean", "reduces over spatial dimension(s) s0, s1", "head")

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

    refused(DataDependent(), "reduces over spatial dimension")

    class ReadsAPixel(nn.Module):
        def forward(self, x):
            return x if x[0, 0, 0, 0].item() > 0 else -x

    refused(ReadsAPixel(), "picks one position")

    class ChannelDecides(nn.Module):
        def forward(self, x):
            return x if x[:, :1].amax(1).gt(0).all() else -x

    refused(ChannelDecides(), "aten.all", "reduces over spatial")

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

    refused(Mixed(), "different resolutions", "return self.strided(x) + self.valid(x)", x=torch.randn(1, 1, 8))


@torch.library.custom_op("lightning_streaming_tests::soft_sign", mutates_args=())
def _soft_sign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


@_soft_sign.register_fake
def _(x):
    return torch.empty_like(x)


def _soft_sign_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _soft_sign_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad / (1 + x.abs()).square()


_soft_sign.register_autograd(_soft_sign_backward, setup_context=_soft_sign_setup)


def test_custom_operator_is_refused_until_its_module_is_registered():
    class SoftSign(nn.Module):  # a custom operator: its inside cannot be followed
        def forward(self, x):
            return _soft_sign(x)

    class Subclass(SoftSign):  # the rule applies to subclasses that keep forward
        pass

    message = refused(nn.Sequential(SoftSign()), "no rule for the operator", "register_module_rule")
    assert "lightning_streaming_tests.soft_sign" in message and "return _soft_sign(x)" in message
    ls.register_module_rule(SoftSign, ls.pixelwise)
    try:
        ls.verify(nn.Sequential(nn.Conv2d(3, 2, 3), SoftSign(), Subclass()), (1, 3, 20, 20), 9)
    finally:
        from lightning_streaming.core import rules

        rules._MODULE_RULES.pop(SoftSign)


def test_a_wrapper_of_known_operations_needs_no_rule():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.special.expit(x)

    ls.verify(nn.Sequential(nn.Conv2d(3, 2, 3), Swish()), (1, 3, 20, 20), 9)


def test_tile_too_small_states_the_minimum_and_the_minimum_works():
    trunk = table1_network()
    with pytest.raises(ls.TileTooSmallError, match=r"minimum usable tile for this 32x32 input is \(7, 7\)") as caught:
        ls.stream(trunk, X, 6)
    assert caught.value.minimum_tile == (7, 7)
    ls.verify(trunk, (1, 3, 32, 32), 7)
    with pytest.raises(ls.TileTooSmallError, match=r"\(7, 7\)"):
        ls.stream(trunk, X, (6, 40))


@pytest.mark.parametrize("tile", [0, -3, (16,), (16, 16, 16), 2.5, "big"])
def test_bad_tile_sizes(tile):
    with pytest.raises(ValueError, match="tile_size must be"):
        ls.stream(table1_network(), X, tile)


def test_auto_tile_size_and_tile_batch_need_valid_settings():
    with pytest.raises(ValueError, match="tile_size='auto' needs memory_budget"):
        ls.stream(table1_network(), X)
    with pytest.raises(ValueError, match="tile_batch must be a positive int"):
        ls.stream(table1_network(), X, 16, tile_batch=0)
    with pytest.raises(ValueError, match="memory_budget .* is not a size"):
        ls.stream(table1_network(), X, memory_budget="lots")


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
    with pytest.raises(ValueError, match=r"cannot run on an input of length 6 .* empty after module '1' \(MaxPool2d\).*"
                       r"smallest length it accepts is 8"):
        ls.stream(trunk, torch.randn(1, 3, 6, 30), 16)
