"""Streamed against conventional, float64: outputs, parameter gradients, input gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trunks import DenseBlock, convnext_trunk, resnet_trunk, table1_network, Bottleneck

import lightning_streaming as ls

torch.manual_seed(0)


def check(trunk: nn.Module, shape: tuple, tile_size, **kwargs) -> ls.VerificationReport:
    """verify() raises on any relative difference above 1e-9 (float64)."""
    report = ls.verify(trunk, shape, tile_size, **kwargs)
    assert report.passed
    return report


# ----------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("tile", [7, 8, 13, 20, 31, 64, 500])
@pytest.mark.parametrize("shape", [(2, 3, 37, 23), (1, 3, 5, 61), (3, 3, 1, 1)])
def test_table1_network_every_tile_size(shape, tile):
    plan = ls.tile_plan(table1_network(), shape, tile)
    check(table1_network(), shape, tile)
    if tile >= max(shape[2:]) + 6:
        assert len(plan) == 1


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, stride=2, padding=0),
        nn.Conv2d(2, 3, (5, 3), stride=(3, 2), padding=(2, 0)),
        nn.Conv2d(2, 3, 3, dilation=3, padding=2),
        nn.Conv2d(2, 3, (3, 2), dilation=(2, 3), stride=(1, 2), padding=(1, 0)),
        nn.Conv2d(2, 4, 3, groups=2, padding=1),
        nn.Conv2d(2, 3, 4, padding="same"),
        nn.Conv2d(2, 3, (2, 5), padding="same", dilation=2),
        nn.Conv2d(2, 3, 3, padding="valid"),
        nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"),
        nn.Conv2d(2, 3, 5, stride=2, padding=2, padding_mode="replicate"),
        nn.Conv2d(2, 3, 1, stride=3),
    ],
    ids=lambda c: repr(c),
)
def test_single_conv_variants(conv):
    trunk = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), conv, nn.Tanh(), nn.Conv2d(conv.out_channels, 2, 3, padding=1))
    for shape in [(2, 2, 41, 29), (1, 2, 30, 47)]:
        geometry_minimum = _minimum_tile(trunk, shape)
        for tile in sorted({geometry_minimum, geometry_minimum + 3, 24, 100}):
            if tile >= geometry_minimum:
                check(trunk, shape, tile)


def _minimum_tile(trunk: nn.Module, shape: tuple) -> int:
    with pytest.raises(ls.TileTooSmallError) as caught:
        ls.tile_plan(trunk, shape, 1)
    assert str(caught.value.minimum_tile) in str(caught.value)
    return max(caught.value.minimum_tile)


# ------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, 2),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        nn.MaxPool2d((2, 3), (2, 3), dilation=(2, 1)),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.AvgPool2d(3, 2, padding=1, count_include_pad=True),
        nn.AvgPool2d(3, 2, padding=1, count_include_pad=False, ceil_mode=True),
        nn.AvgPool2d(5, 3, ceil_mode=True),
    ],
    ids=lambda p: repr(p),
)
def test_pooling_variants(pool):
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 3, 3, padding=1), pool)
    for shape in [(2, 3, 45, 31), (1, 3, 50, 67)]:
        minimum = _minimum_tile(trunk, shape)
        for tile in (minimum, minimum + 5, 40, 200):
            if tile >= minimum:
                check(trunk, shape, tile)


def test_table2_imagenette_network_first_two_blocks():
    """The paper's ImageNette experiment streamed the first two blocks with 160x160 tiles."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 7), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2)
    )
    check(trunk, (2, 3, 320, 320), 160)
    check(trunk, (1, 3, 333, 291), 160)


# ------------------------------------------------------------------------- branching


@pytest.mark.parametrize("shape", [(2, 3, 67, 45), (1, 3, 96, 128), (2, 3, 33, 71)])
def test_resnet_basic_blocks_with_strided_shortcuts(shape):
    trunk = resnet_trunk(depth=2)
    minimum = _minimum_tile(trunk, shape)
    for tile in (minimum, minimum + 9, 64):
        if tile >= minimum:
            check(trunk, shape, tile)


def test_resnet_bottleneck_blocks():
    check(resnet_trunk(Bottleneck, [1, 2, 1, 1], width=4, depth=3), (2, 3, 150, 97), 96)


def test_densenet_style_concatenation():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DenseBlock(), nn.Conv2d(6, 3, 3))
    check(trunk, (2, 3, 51, 38), 17)
    check(trunk, (1, 3, 20, 77), 30)


def test_convnext_style_layernorm_linear_and_layer_scale():
    trunk = convnext_trunk()
    for name, p in trunk.named_parameters():  # non-trivial norm affine parameters
        if "norm" in name or p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5) if name.endswith("weight") else nn.init.uniform_(p, -0.3, 0.3)
    report = check(trunk, (2, 3, 203, 157), 120)
    assert any("norm.weight" in name for name in report.parameter_grads)
    assert any("layer_scale" in name for name in report.parameter_grads)


def test_residual_branches_with_different_kernels_and_padding():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 5, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1))
            self.b = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(3, 5, 1))
            self.c = nn.MaxPool2d(3, 2, padding=1)

        def forward(self, x):
            return self.a(x) * torch.sigmoid(self.b(x)) - torch.cat([self.c(x), self.c(x)[:, :2]], dim=1)

    check(Block(), (2, 3, 43, 30), 20)
    check(Block(), (1, 3, 16, 57), 12)


# ---------------------------------------------------------------- functional and pads


def test_functional_operations_and_padding_layers():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bias = nn.Parameter(torch.randn(4))
            self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
            self.pad = nn.ReflectionPad2d((1, 2, 0, 1))

        def forward(self, x):
            x = F.conv2d(x, self.weight, self.bias, stride=2, padding=1)
            x = F.leaky_relu(x, 0.1) * self.scale
            x = F.max_pool2d(x, 3, 1, 1, ceil_mode=True)
            x = F.pad(x, (2, 1, 1, 2), mode="replicate")
            x = self.pad(x)
            x = F.pad(x, (1, 1, 1, 1), value=0.0)
            return F.avg_pool2d(x, 2, ceil_mode=True) + 1.0

    check(Functional(), (2, 3, 41, 35), 24)
    check(Functional(), (1, 3, 9, 80), 21)


def test_eval_mode_dropout_and_batchnorm_are_streamed():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout2d(0.5), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    trunk[1].running_mean.uniform_(-1, 1)
    check(trunk, (2, 3, 30, 30), 12)


def test_frozen_parameters_get_no_gradient():
    trunk = table1_network()
    trunk[0].weight.requires_grad_(False)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    trunk = trunk.double()
    out = ls.stream(trunk, x, 12)
    out.sum().backward()
    assert trunk[0].weight.grad is None
    assert trunk[0].bias.grad is not None


# ------------------------------------------------------------------- 1D and 3D, sizes


def test_one_dimensional_signals():
    trunk = nn.Sequential(
        nn.Conv1d(2, 4, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool1d(3, 2, ceil_mode=True),
        nn.Conv1d(4, 3, 3, dilation=2), nn.AvgPool1d(2, ceil_mode=True),
    )  # fmt: skip
    for length in (57, 200, 1001):
        check(trunk, (3, 2, length), 40)


def test_three_dimensional_volumes():
    trunk = nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, ceil_mode=True),
        nn.Conv3d(3, 2, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 2)),
    )  # fmt: skip
    check(trunk, (2, 1, 17, 22, 13), (10, 12, 9))
    check(trunk, (1, 1, 9, 9, 30), 12)


def test_image_smaller_than_one_tile_and_identity_trunks():
    check(table1_network(), (2, 3, 5, 4), 1000)
    check(nn.Sequential(), (1, 2, 7, 9), 3)
    check(nn.Sequential(nn.ReLU(), nn.Identity()), (1, 2, 7, 9), 1)


@pytest.mark.parametrize("keep_graphs", [0, 1, 3, 100])
def test_kept_graphs_give_the_same_result(keep_graphs):
    check(resnet_trunk(depth=1), (2, 3, 130, 101), 60, keep_graphs=keep_graphs)


# --------------------------------------------------------------- autograd behaviour


def test_input_without_grad_still_trains_parameters_and_hooks_fire_once():
    trunk = resnet_trunk(depth=1).double()
    x = torch.randn(2, 3, 150, 128, dtype=torch.float64)
    calls = {name: 0 for name, _ in trunk.named_parameters()}
    for name, p in trunk.named_parameters():
        p.register_hook(lambda g, name=name: calls.__setitem__(name, calls[name] + 1))
    plan = ls.tile_plan(trunk, x.shape, 60)
    assert len(plan) > 4
    out = ls.stream(trunk, x, 60)
    assert out.requires_grad and not x.requires_grad
    out.square().sum().backward()
    assert set(calls.values()) == {1}

    streamed = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad()
    trunk(x).square().sum().backward()
    for name, p in trunk.named_parameters():
        torch.testing.assert_close(streamed[name], p.grad, rtol=1e-10, atol=1e-12)


def test_gradients_accumulate_across_backward_calls():
    trunk = table1_network().double()
    x = torch.randn(1, 3, 33, 30, dtype=torch.float64)
    for _ in range(2):
        ls.stream(trunk, x, 16).sum().backward()
    streamed = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    for _ in range(2):
        trunk(x).sum().backward()
    for a, b in zip(streamed, trunk.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_forward_keeps_no_graph_and_matches():
    trunk = resnet_trunk(depth=2).double()
    x = torch.randn(2, 3, 190, 170, dtype=torch.float64)
    with torch.no_grad():
        out = ls.stream(trunk, x, 110)
        expected = trunk(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_double_backward_is_refused_clearly():
    trunk = table1_network().double()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    out = ls.stream(trunk, x, 12)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_transform_normalises_uint8_tiles_like_the_full_image(tile_batch):
    trunk = table1_network().double()
    image = torch.randint(0, 256, (2, 3, 45, 37), dtype=torch.uint8)
    mean = torch.tensor([180.0, 130.0, 170.0], dtype=torch.float64).view(1, 3, 1, 1)

    def normalise(tile):
        return (tile.double() - mean) / 50.0

    out = ls.stream(trunk, image, 20, transform=normalise, tile_batch=tile_batch)
    out.square().sum().backward()
    streamed = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    expected = trunk(normalise(image))
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(streamed, trunk.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)


def test_float32_matches_to_float32_rounding():
    report = ls.verify(resnet_trunk(depth=2), (2, 3, 180, 164), 110, dtype=torch.float32)
    assert report.worst < 1e-4


def test_verify_detects_a_wrong_geometry(monkeypatch):
    """The verification helper itself can fail: shrink the convolution windows and it must notice."""
    import weakref
    from collections import OrderedDict

    from lightning_streaming.core import aten_rules, graph

    def too_small_kernel(kernel=1, stride=1, dilation=1, pad_lo=0, pad_hi=0, *args, **kwargs):
        return ls.Window(1, stride, 1, 0, 0)  # the same output length for 3x3 'same' convolutions

    monkeypatch.setattr(aten_rules, "Window", too_small_kernel)
    monkeypatch.setattr(graph, "_BY_STRUCTURE", OrderedDict())
    monkeypatch.setattr(graph, "_BY_MODULE", weakref.WeakKeyDictionary())
    with pytest.raises(ls.StreamingMismatchError, match="differ"):
        ls.verify(table1_network(), (1, 3, 30, 30), 10)
    report = ls.verify(table1_network(), (1, 3, 30, 30), 10, raise_on_mismatch=False)
    assert not report.passed and "FAILED" in str(report)


class MemmapSource(ls.RegionSource):
    """A uint8 image on disk, read box by box: it is never loaded whole."""

    def __init__(self, path, shape):
        self.array = np.lib.format.open_memmap(path, mode="r")
        self._shape = shape
        self.reads = []

    @property
    def shape(self):
        return self._shape

    def read(self, region):
        self.reads.append(tuple((s.start, s.stop) for s in region))
        return torch.from_numpy(np.ascontiguousarray(self.array[(slice(None), slice(None), *region)]))


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_lazy_region_source_is_read_box_by_box_and_matches(tmp_path, tile_batch):
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 61, 47), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    source = MemmapSource(tmp_path / "image.npy", image.shape)
    trunk = resnet_trunk(depth=1).double()

    def normalise(tile):
        return tile.double() / 255 - 0.5

    out = ls.stream(trunk, source, 48, transform=normalise, tile_batch=tile_batch)
    out.sum().backward()
    streamed = [p.grad.clone() for p in trunk.parameters()]
    plan = ls.stream_plan(trunk, image.shape, 48, tile_batch=tile_batch)
    tiles, kept = len(plan.tiles), plan.keep_graphs  # with batching, the last call's tiles are kept
    assert plan.tile_batch == tile_batch and kept == len(plan.runs[-1])
    assert tiles > 2 and len(source.reads) == 2 * tiles - kept  # forward, then recompute all but the kept tiles
    assert all((b - a) <= 48 for box in source.reads for a, b in box)
    trunk.zero_grad()
    expected = trunk(normalise(torch.from_numpy(image)))
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(streamed, trunk.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)
    moments = ls.channel_moments(trunk, source, 48, "0", transform=normalise)
    torch.testing.assert_close(moments.sum, ls.ChannelMoments.of(trunk[0](normalise(torch.from_numpy(image)))).sum)


def test_region_source_returning_a_wrong_shape_is_reported():
    class Broken(ls.RegionSource):
        shape = (1, 3, 40, 40)

        def read(self, region):
            return torch.zeros(1, 3, 5, 5, dtype=torch.uint8)

    with pytest.raises(ValueError, match=r"Broken.read.*returned \(1, 3, 5, 5\), expected a tensor of shape"):
        ls.stream(table1_network(), Broken(), 16, transform=lambda t: t.float())


@pytest.mark.parametrize("keep_transform", [False, True])
def test_input_gradients_tile_by_tile_sum_to_the_input_gradient(keep_transform):
    """Per-tile input gradients, added over their (overlapping) regions, equal the input gradient."""
    from lightning_streaming.core import input_gradients

    trunk = resnet_trunk(depth=1).double()
    image = torch.randint(0, 256, (2, 3, 75, 61), dtype=torch.uint8)

    def normalise(tile):
        return tile.double() / 255 - 0.5

    pixels = normalise(image).requires_grad_()
    out = trunk(pixels)
    grad_output = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, pixels, grad_output)
    total = torch.zeros_like(expected)
    regions = []
    source = image if keep_transform else normalise(image)
    transform = normalise if keep_transform else None
    for region, gradient in input_gradients(trunk, source, 50, grad_output, transform=transform):
        total[(slice(None), slice(None), *region)] += gradient
        regions.append(region)
    assert len(regions) == len(ls.tile_plan(trunk, image.shape, 50)) > 2
    assert regions == sorted(regions, key=lambda r: tuple(s.start for s in r))  # raster order
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-13)
    assert all(p.grad is None for p in trunk.parameters())
