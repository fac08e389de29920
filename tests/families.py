"""Blocks of real model families, written the way their libraries write them (torchvision,
timm, MONAI, temporal convolutional networks), since those libraries cannot be installed
beside the pinned CPU torch here. Each spells a local computation differently: the
analyser must recognise the meaning, not the spelling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth: the identity in eval mode."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class DropPath(nn.Module):
    """timm's DropPath, with its own spelling of the same thing."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: depthwise 7x7, channels-last LayerNorm and MLP, layer scale,
    stochastic depth. ``movedim`` switches to timm's spelling of the permutes."""

    def __init__(self, dim: int, drop: float = 0.1, movedim: bool = False):
        super().__init__()
        self.movedim = movedim
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.to_last, self.to_first = Permute([0, 2, 3, 1]), Permute([0, 3, 1, 2])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x):
        y = self.dwconv(x)
        y = y.movedim(1, -1) if self.movedim else self.to_last(y)
        y = self.mlp(self.norm(y))
        y = y.movedim(-1, 1) if self.movedim else self.to_first(y)
        return x + self.stochastic_depth(self.layer_scale * y)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: permute, layer_norm, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: asserts the rank, calls F.batch_norm with every argument."""

    def __init__(self, num_features: int, act: type = nn.SiLU):
        super().__init__(num_features)
        self.act = act()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        B, C, H, W = x.shape
        assert C == self.num_features
        bn_training = self.training and self.running_mean is None
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                         self.momentum or 0.0, self.eps)  # fmt: skip
        return self.act(x)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: weight standardisation, F.conv2d with positional arguments."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's InvertedResidual (stride 1 and 2)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        half = channels // 2
        inp = channels if stride > 1 else half
        self.branch1 = (
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels), nn.Conv2d(channels, half, 1),
                          nn.ReLU())  # fmt: skip
            if stride > 1
            else nn.Identity()
        )
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp, half, 1), nn.ReLU(), nn.Conv2d(half, half, 3, stride, 1, groups=half),
            nn.Conv2d(half, half, 1), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class Res2NetBlock(nn.Module):
    """timm's Bottle2neck: torch.split into scales, a hierarchy of 3x3 convolutions, cat."""

    def __init__(self, channels: int, scale: int = 4):
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        spx = torch.split(x, self.width, 1)
        spo = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(conv(sp), inplace=True)
            spo.append(sp)
        spo.append(spx[-1])
        return self.conv3(torch.cat(spo, 1)) + x


class GhostModule(nn.Module):
    """GhostNet: a cheap depthwise branch concatenated, then sliced to the output width."""

    def __init__(self, inp: int, oup: int):
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / 2)
        self.primary = nn.Sequential(nn.Conv2d(inp, init, 1), nn.ReLU(inplace=True))
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init), nn.ReLU(inplace=True))

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return out[:, : self.oup, :, :]


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv with torchvision's stochastic depth and BatchNormAct."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels * expand, 3, padding=1, bias=False), BatchNormAct2d(channels * expand),
            nn.Conv2d(channels * expand, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.stochastic_depth = StochasticDepth(0.2)

    def forward(self, x):
        return x + self.stochastic_depth(self.block(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 with ReLU6 and a strided depthwise convolution."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int = 3):
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.Hardswish(inplace=True), nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TemporalBlock(nn.Module):
    """A temporal convolutional network's block: weight-normalised causal dilated Conv1d
    (padding both sides, then the right padding cropped by slicing), residual 1x1."""

    def __init__(self, inp: int, oup: int, kernel: int, dilation: int):
        super().__init__()
        self.chomp = (kernel - 1) * dilation
        self.conv1 = parametrizations.weight_norm(nn.Conv1d(inp, oup, kernel, padding=self.chomp, dilation=dilation))
        self.conv2 = parametrizations.weight_norm(nn.Conv1d(oup, oup, kernel, padding=self.chomp, dilation=dilation))
        self.downsample = nn.Conv1d(inp, oup, 1) if inp != oup else None

    def forward(self, x):
        out = torch.relu(self.conv1(x)[:, :, : -self.chomp].contiguous())
        out = torch.relu(self.conv2(out)[:, :, : -self.chomp].contiguous())
        res = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + res)


def double_conv(inp: int, oup: int, dims: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(inp, oup, 3, padding=1), nn.ReLU(inplace=True), conv(oup, oup, 3, padding=1),
                         nn.ReLU(inplace=True))  # fmt: skip


class UNet(nn.Module):
    """A U-Net: max-pooled encoder, decoder by transposed convolution (or bilinear
    upsampling), skip connections concatenated, output at the input's resolution."""

    def __init__(self, inp: int = 3, classes: int = 2, width: int = 4, depth: int = 3, up: str = "transpose",
                 dims: int = 2):  # fmt: skip
        super().__init__()
        self.up_mode = up
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(inp, widths[0], dims)])
        self.down.extend(double_conv(widths[i], widths[i + 1], dims) for i in range(depth))
        transpose = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        mode = "bilinear" if dims == 2 else "trilinear"
        self.up = nn.ModuleList(
            transpose(widths[i + 1], widths[i], 2, stride=2)
            if up == "transpose"
            else nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), conv(widths[i + 1], widths[i], 1))
            for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(double_conv(2 * widths[i], widths[i], dims) for i in reversed(range(depth)))
        self.head = conv(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


class FPN(nn.Module):
    """A backbone with C2..C5 and torchvision's FeaturePyramidNetwork top-down pathway
    (nearest interpolation to the lateral's size), returning an OrderedDict of levels."""

    def __init__(self, width: int = 4, out: int = 4, interpolate_to_size: bool = True):
        super().__init__()
        self.to_size = interpolate_to_size
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        widths = [width * 2**i for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[max(i - 1, 0)], widths[i], 3, 1 if i == 0 else 2, 1), nn.ReLU())
            for i in range(4)
        )
        self.inner = nn.ModuleList(nn.Conv2d(w, out, 1) for w in widths)
        self.layer = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in widths)

    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        last = self.inner[-1](features[-1])
        results = [self.layer[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner[i](features[i])
            if self.to_size:
                top_down = F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            else:
                top_down = F.interpolate(last, scale_factor=2, mode="nearest")
            last = lateral + top_down
            results.insert(0, self.layer[i](last))
        from collections import OrderedDict

        return OrderedDict((f"p{i + 2}", r) for i, r in enumerate(results))


class HRNetFuse(nn.Module):
    """HRNet's exchange unit: two branches at strides 1 and 2 (and 4), each output sums all
    branches brought to its resolution: strided 3x3 convolutions down, 1x1 convolution and
    nearest upsampling (nn.Upsample) up. Returns the list of branches."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.down2 = nn.Conv2d(2 * width, 4 * width, 3, 2, 1)
        self.branches = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in (width, 2 * width, 4 * width))
        self.up = nn.ModuleDict({
            "1to0": nn.Sequential(nn.Conv2d(2 * width, width, 1), nn.Upsample(scale_factor=2, mode="nearest")),
            "2to0": nn.Sequential(nn.Conv2d(4 * width, width, 1), nn.Upsample(scale_factor=4, mode="nearest")),
            "2to1": nn.Sequential(nn.Conv2d(4 * width, 2 * width, 1), nn.Upsample(scale_factor=2, mode="bilinear")),
        })  # fmt: skip
        self.fuse_down = nn.ModuleDict({
            "0to1": nn.Conv2d(width, 2 * width, 3, 2, 1),
            "0to2": nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 4 * width, 3, 2, 1)),
            "1to2": nn.Conv2d(2 * width, 4 * width, 3, 2, 1),
        })  # fmt: skip

    def forward(self, x):
        x0 = torch.relu(self.stem(x))
        x1 = torch.relu(self.down1(x0))
        x2 = torch.relu(self.down2(x1))
        b = [branch(v) for branch, v in zip(self.branches, (x0, x1, x2))]
        y0 = b[0] + self.up["1to0"](b[1]) + self.up["2to0"](b[2])
        y1 = self.fuse_down["0to1"](b[0]) + b[1] + self.up["2to1"](b[2])
        y2 = self.fuse_down["0to2"](b[0]) + self.fuse_down["1to2"](b[1]) + b[2]
        return [torch.relu(y0), torch.relu(y1), torch.relu(y2)]


class SubPixel(nn.Module):
    """ESPCN-style super-resolution tail and a space-to-depth stem (pixel unshuffle)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, width, 3, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(width, 3 * 9, 3, padding=1), nn.PixelShuffle(3))

    def forward(self, x):
        return self.tail(self.stem(x))


class Focus(nn.Module):
    """YOLOv5's Focus: space-to-depth by strided slicing and concatenation."""

    def __init__(self, inp: int = 3, oup: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(inp * 4, oup, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class EinopsLikeRearrange(nn.Module):
    """A channels-last MLP written as flatten/transpose/reshape (what einops' rearrange
    'b c h w -> b (h w) c' and back compile to)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).transpose(1, 2)  # b (h w) c
        tokens = self.fc(tokens).swapaxes(1, 2)
        return tokens.reshape(b, c, h, w)


# ------------------------------------------------------------------ not local: refused


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: global average pooling, two 1x1 convolutions, scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, 2, 1), nn.Conv2d(2, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))


class EffectiveSE(nn.Module):
    """timm's EffectiveSEModule: x.mean((2, 3), keepdim=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN (channels last): a norm over the spatial dimensions."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return (self.gamma * (x * nx) + self.beta + x).permute(0, 3, 1, 2)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WindowAttention(nn.Module):
    """Self-attention over all positions of the feature map."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        attention = (q @ k.transpose(-2, -1) * c**-0.5).softmax(dim=-1)
        return (attention @ v).transpose(1, 2).reshape(b, c, h, w)


class CoordConv(nn.Module):
    """Concatenates pixel coordinates of the feature map: absolute positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels + 2, channels, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, ys.to(x.dtype), xs.to(x.dtype)], dim=1))


class PadToMatch(nn.Module):
    """A U-Net up block that pads to the skip connection's size (milesial/Pytorch-UNet)."""

    def __init__(self, channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        skip = x
        y = self.up(self.pool(x))
        diff_y, diff_x = skip.size()[2] - y.size()[2], skip.size()[3] - y.size()[3]
        y = F.pad(y, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return torch.cat([skip, y], dim=1)
