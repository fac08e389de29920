"""Trunks of real model families, and every spelling of a local computation, stream exactly;
what is not local is refused with a message that names it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import families as fam
import lightning_streaming as ls
from trunks import minimum_tile


def check(trunk: nn.Module, shape: tuple, tile) -> ls.VerificationReport:
    """verify() raises on any relative difference above 1e-9 (float64); the issue's bar is 1e-8."""
    report = ls.verify(trunk.eval(), shape, tile)
    assert report.passed and report.worst < 1e-10, report
    assert len(report.plan) > 1, "the case must really be tiled"
    return report


def minimum(trunk: nn.Module, shape: tuple) -> tuple[int, ...]:
    return minimum_tile(trunk.eval(), shape)


def at_minimum_and_beyond(trunk: nn.Module, shape: tuple, extra: int = 13) -> None:
    """At the smallest usable tile (awkward on purpose) and at a larger one."""
    smallest = minimum(trunk, shape)
    check(trunk, shape, smallest)
    larger = tuple(m + extra for m in smallest)
    if any(n > t for n, t in zip(shape[2:], larger)):
        check(trunk, shape, larger)


# ------------------------------------------------------------- spellings of local ops


FAMILIES = {
    "convnext-permute-and-movedim": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 4, 4), fam.LayerNorm2d(8), fam.ConvNeXtBlock(8), fam.ConvNeXtBlock(8, movedim=True)
    ),
    "timm-bnact-stdconv-fusedmbconv": lambda: nn.Sequential(
        fam.StdConv2d(3, 8, 3, padding=1, dilation=1), fam.BatchNormAct2d(8), fam.FusedMBConv(8),
        fam.StdConv2d(8, 8, 3, 1, 2, 2),
    ),
    "shufflenet": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fam.ShuffleUnit(8, 2), fam.ShuffleUnit(8, 1)),
    "res2net-ghost": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fam.Res2NetBlock(8), fam.GhostModule(8, 6)),
    "mobilenet": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), fam.InvertedResidual(8, 8, 1), fam.InvertedResidual(8, 12, 2)
    ),
    "einops-style-rearrange": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fam.EinopsLikeRearrange(8)),
    "focus-space-to-depth": lambda: nn.Sequential(fam.Focus(), nn.ReLU(), nn.Conv2d(8, 4, 3, 2, 1)),
    "drop-path-eval": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), fam.DropPath(0.3), nn.Conv2d(4, 2, 3, 2)),
    "spectral-norm-eval-stack": lambda: nn.Sequential(
        nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)), _Lambda(lambda x: torch.stack([x, 2 * x], dim=2).sum(2))
    ),
}


def _randomise_norms(trunk: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in trunk.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
            if module.weight is not None:
                module.weight.data.uniform_(0.5, 1.5, generator=generator)
                module.bias.data.uniform_(-0.3, 0.3, generator=generator)
    return trunk


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("shape", [(2, 3, 83, 61), (1, 3, 58, 97)])
def test_model_family_blocks(name, shape):
    if name == "focus-space-to-depth":  # four strided slices are joined: only even sizes run at all
        shape = shape[:2] + tuple(n // 2 * 2 for n in shape[2:])
    at_minimum_and_beyond(_randomise_norms(FAMILIES[name]()), shape)


def test_temporal_convolutional_network_with_weight_norm_and_causal_crop():
    trunk = nn.Sequential(fam.TemporalBlock(2, 4, 3, 1), fam.TemporalBlock(4, 4, 3, 2), fam.TemporalBlock(4, 3, 2, 4))
    for length in (301, 77):
        at_minimum_and_beyond(trunk, (2, 2, length), extra=31)
    names = [name for name, _ in trunk.named_parameters()]
    assert any("parametrizations.weight.original0" in name for name in names)  # weight_norm's g


def test_reading_rank_batch_and_channels_is_fine():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            assert x.ndim == 4 and x.dim() == 4
            n, c, h, w = x.shape
            y = self.conv(x) * (1.0 / c) + n  # channel count and batch size as numbers: the same in every tile
            if y.shape[1] != 4:
                raise AssertionError
            return y.view(n, 2, 2, h, w).sum(2)  # the spatial sizes flow back into the same sizes

    check(Reads(), (2, 3, 41, 29), 16)


@pytest.mark.parametrize(
    "conv",
    [
        lambda x, w, b: F.conv2d(x, w, b, 1, 2, 2, 1),  # positional dilation 2 (timm's StdConv2d)
        lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 2), (1, 2), 1),
        lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=2, dilation=2),
        lambda x, w, b: torch.conv2d(x, w, b, 1, "same", 2, 1),
        lambda x, w, b: torch.nn.functional.conv2d(input=x, weight=w, bias=b, padding="valid", dilation=3),
    ],
)
def test_convolution_arguments_are_read_by_pytorchs_signature(conv):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return conv(x, self.weight, self.bias)

    at_minimum_and_beyond(Functional(), (2, 3, 47, 38))


def test_causal_crops_and_strided_slices():
    class Crops(nn.Module):
        def forward(self, x):
            x = x[:, :, 2:-3, :]
            x = x[..., : x.shape[-1] - 2]
            x = x[:, :, ::2, 1::3]
            return x[:, :, 1:, :-1]

    at_minimum_and_beyond(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), Crops(), nn.Conv2d(3, 2, 3)), (2, 2, 66, 71))


# -------------------------------------------------------------- resolution changes


@pytest.mark.parametrize(
    "up",
    [
        nn.ConvTranspose2d(3, 4, 2, stride=2),
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(3, 4, 4, stride=3, padding=2, output_padding=2, dilation=2),
        nn.ConvTranspose2d(3, 6, 3, stride=(2, 3), padding=(0, 1), groups=3),
        nn.ConvTranspose2d(3, 4, 5, stride=1, padding=2),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Upsample(scale_factor=3, mode="nearest"),
        nn.Upsample(scale_factor=(2, 4), mode="nearest-exact"),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Upsample(scale_factor=3, mode="bilinear", align_corners=False),
        nn.Upsample(scale_factor=2, mode="bicubic"),
        nn.Upsample(scale_factor=0.5, mode="nearest"),
        nn.Upsample(scale_factor=0.5, mode="bilinear"),
        nn.PixelShuffle(2),
    ],
    ids=repr,
)
def test_resolution_changing_layers(up):
    trunk = nn.Sequential(nn.Conv2d(3, 12 if isinstance(up, nn.PixelShuffle) else 3, 3, padding=1), nn.ReLU(), up)
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 16, 16)).shape[1]
    trunk.append(nn.Conv2d(channels, 2, 3, stride=2))
    for shape in [(2, 3, 39, 28), (1, 3, 22, 53)]:
        at_minimum_and_beyond(trunk, shape)


def test_transposed_convolutions_in_1d_and_3d():
    one = nn.Sequential(nn.Conv1d(2, 3, 3, 2), nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2))
    at_minimum_and_beyond(one, (2, 2, 97))
    three = nn.Sequential(nn.Conv3d(1, 2, 3, 2, 1), nn.ReLU(), nn.ConvTranspose3d(2, 1, 2, 2), nn.Conv3d(1, 1, 3))
    at_minimum_and_beyond(three, (1, 1, 18, 23, 15), extra=5)


def test_pixel_unshuffle_needs_divisible_tiles():
    trunk = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 3), nn.PixelShuffle(2))
    at_minimum_and_beyond(trunk, (2, 3, 50, 38))
    plan = ls.tile_plan(trunk, (2, 3, 50, 38), 20)
    assert all(s.size % 2 == 0 for segments in plan.segments for s in segments)
    with pytest.raises(ValueError, match="does not accept a feature map of length 37"):
        ls.tile_plan(trunk, (2, 3, 50, 37), 20)


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
@pytest.mark.parametrize("shape", [(2, 3, 128, 96), (1, 3, 64, 136)])
def test_unet_streams_at_full_resolution(up, shape):
    trunk = fam.UNet(up=up)
    smallest = minimum(trunk, shape)
    report = check(trunk, shape, smallest)
    assert report.plan.output_shape == shape[2:]


def test_unet_3d():
    trunk = fam.UNet(inp=1, depth=2, dims=3)
    check(trunk, (1, 1, 56, 40, 36), minimum(trunk, (1, 1, 56, 40, 36)))


def test_unet_size_constraints_are_explained():
    trunk = fam.UNet(depth=3)
    with pytest.raises(ValueError, match=r"length 95 .* branches of lengths .* meet .*equal lengths"):
        ls.tile_plan(trunk, (1, 3, 96, 95), 64)


def test_fpn_levels_returned_as_a_dict_with_size_tied_interpolation():
    for to_size in (True, False):
        trunk = fam.FPN(interpolate_to_size=to_size)
        report = check(trunk, (2, 3, 256, 320), (256, 224))
        assert len(report.plan.output_shapes) == 4
        out = ls.stream(trunk.double(), torch.randn(2, 3, 256, 320, dtype=torch.float64), (256, 224))
        assert list(out) == ["p2", "p3", "p4", "p5"]
        assert [tuple(v.shape[2:]) for v in out.values()] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    # Sizes for which the top-down resize is not an exact factor 2 are explained, not streamed inexactly.
    with pytest.raises(ValueError, match=r"length 250 .*families.py.*F.interpolate.*resizes to the length of another"):
        ls.tile_plan(fam.FPN(), (1, 3, 250, 320), 160)


def test_hrnet_fuse_layers_join_branches_at_different_resolutions():
    report = check(fam.HRNetFuse(), (2, 3, 52, 44), 28)
    assert report.plan.output_shapes == ((52, 44), (26, 22), (13, 11))


def test_sub_pixel_convolution():
    at_minimum_and_beyond(fam.SubPixel(), (1, 3, 30, 22))


def test_every_output_is_partitioned_whatever_its_resolution():
    trunk = fam.HRNetFuse()
    plan = ls.tile_plan(trunk, (1, 3, 52, 44), 28)
    for dim in range(2):
        for k, length in enumerate(shape[dim] for shape in plan.output_shapes):
            covered = [(s.outputs[k][0], s.outputs[k][1]) for s in plan.segments[dim]]
            assert covered[0][0] == 0 and covered[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


# ------------------------------------------------------------------------ refusals


REFUSED = {
    "squeeze-excitation": (lambda: fam.SqueezeExcitation(3), ["module '0.avgpool' (AdaptiveAvgPool2d)", "global pooling"]),
    "effective-se": (lambda: fam.EffectiveSE(3), ["x.mean((2, 3), keepdim=True)", "squeeze-and-excitation"]),
    "global-response-norm": (lambda: fam.GlobalResponseNorm(3), ["torch.norm(x, p=2, dim=(1, 2)", "reduces over spatial"]),
    "tf-same-padding": (lambda: fam.Conv2dSame(3, 3, 3, 2), ["F.pad(x, [pad_w // 2", "'same' padding"]),
    "pad-to-match": (lambda: fam.PadToMatch(3), ["padding is computed from the feature map's size"]),
    "attention": (lambda: fam.WindowAttention(3), ["every position with every other"]),
    "coordconv": (lambda: fam.CoordConv(3), ["torch.linspace(-1, 1, h", "converts a spatial size to a number"]),
    "groupnorm": (lambda: nn.GroupNorm(1, 3), ["GroupNorm"]),
    "instancenorm": (lambda: nn.InstanceNorm2d(3), ["InstanceNorm2d", "statistics"]),
    "stochastic-depth-training": (lambda: fam.ConvNeXtBlock(3).train(), ["draws random numbers", "bernoulli_"]),
    "align-corners": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), ["align_corners=True"]),
    "absolute-size": (lambda: nn.Upsample(size=(64, 64)), ["absolute size"]),
    "area-resize": (lambda: nn.Upsample(scale_factor=0.5, mode="area"), ["avg_pool"]),
    "flip": (lambda: _Lambda(lambda x: x.flip(-1)), ["rearranges spatial dimension"]),
    "roll": (lambda: _Lambda(lambda x: torch.roll(x, 2, -1)), ["rearranges spatial dimension"]),
    "cumsum": (lambda: _Lambda(lambda x: x.cumsum(2)), ["scans or sorts along a spatial dimension"]),
    "size-as-value": (lambda: _Lambda(lambda x: x / x.shape[-1]), ["spatial size", "as a value"]),
    "size-as-int": (lambda: _Lambda(lambda x: x * int(x.shape[-1])), ["converts a spatial size to a number"]),
    "size-as-tensor": (lambda: _Lambda(lambda x: x * torch.tensor(x.shape[-1])), ["converts a spatial size"]),
    "square-assertion": (lambda: _Lambda(_square_only), ["compares sizes of different spatial dimensions"]),
    "spectral-norm-training": (lambda: nn.utils.spectral_norm(nn.Conv2d(3, 3, 3)).train(),
                               ["changes the trunk's own state", "weight_v"]),  # fmt: skip
    "counter-buffer": (lambda: _Counter(), ["changes the trunk's own state", "'0.calls'"]),
    "position-embedding": (lambda: _Lambda(lambda x, p=torch.randn(1, 3, 8, 8): x + F.interpolate(p, size=(8, 8))),
                           ["absolute position"]),  # fmt: skip
}


class _Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class _Counter(nn.Module):
    """Counts its calls in a buffer: the forward is not a pure function of its input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def _square_only(x):
    assert x.shape[-1] == x.shape[-2], "square images only"
    return x


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_local_operations_are_refused_and_named(name):
    make, words = REFUSED[name]
    trunk = nn.Sequential(make())
    if name not in ("stochastic-depth-training", "spectral-norm-training"):
        trunk.eval()
    with pytest.raises(ls.NotLocalError) as caught:
        ls.tile_plan(trunk, (1, 3, 64, 64), 32)
    message = str(caught.value)
    for word in words:
        assert word in message, message
