"""Random encoder-decoder and multi-output trunks, random awkward sizes and tiles: every
output and every gradient streamed equals the conventional one (float64)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_streaming as ls
from trunks import minimum_tile


def _down(rng: random.Random, channels: int) -> nn.Module:
    kind = rng.choice(["maxpool", "avgpool", "conv", "unshuffle", "slice"])
    if kind == "maxpool":
        return nn.MaxPool2d(2, ceil_mode=rng.random() < 0.3)
    if kind == "avgpool":
        return nn.AvgPool2d(2)
    if kind == "conv":  # halves even lengths exactly, so the decoder can meet the skip connection
        kernel, padding = rng.choice([(2, 0), (3, 1), (4, 1)])
        return nn.Conv2d(channels, channels, kernel, 2, padding)
    if kind == "unshuffle":
        return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * channels, channels, 1))
    return _Every2nd()


class _Every2nd(nn.Module):
    def forward(self, x):
        return x[:, :, ::2, ::2]


def _up(rng: random.Random, channels: int) -> nn.Module:
    kind = rng.choice(["transpose", "nearest", "bilinear", "shuffle", "transpose3"])
    if kind == "transpose":
        return nn.ConvTranspose2d(channels, channels, 2, 2)
    if kind == "transpose3":
        return nn.ConvTranspose2d(channels, channels, 3, 2, padding=1, output_padding=1)
    if kind == "shuffle":
        return nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.PixelShuffle(2))
    return nn.Upsample(scale_factor=2, mode=kind)


def _conv(rng: random.Random, channels: int) -> nn.Module:
    kernel, dilation = rng.choice([1, 3, 5]), rng.randint(1, 2)
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate"])),
        rng.choice([nn.ReLU(), nn.GELU(), nn.Tanh()]),
    )  # fmt: skip


class RandomEncoderDecoder(nn.Module):
    """Encoder of random convolutions and downsamplings, decoder of random upsamplings,
    skip connections joined by addition or concatenation; returns the decoder's output,
    or a list/dict of several of its feature maps at different resolutions."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.channels = rng.randint(1, 3)
        self.depth = rng.randint(1, 3)
        self.returns = rng.choice(["tensor", "tensor", "list", "dict"])
        self.join = rng.choice(["add", "cat"])
        c = self.channels
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.encode = nn.ModuleList(_conv(rng, c) for _ in range(self.depth + 1))
        self.down = nn.ModuleList(_down(rng, c) for _ in range(self.depth))
        self.up = nn.ModuleList(_up(rng, c) for _ in range(self.depth))
        self.decode = nn.ModuleList(
            nn.Conv2d(2 * c if self.join == "cat" else c, c, 3, padding=1) for _ in range(self.depth)
        )

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for i in range(self.depth):
            x = self.encode[i](x)
            skips.append(x)
            x = self.down[i](x)
        x = self.encode[-1](x)
        levels = [x]
        for up, decode in zip(self.up, self.decode):
            y, skip = up(x), skips.pop()
            x = decode(torch.cat([skip, y], 1) if self.join == "cat" else F.relu(skip + y))
            levels.append(x)
        if self.returns == "tensor":
            return x
        if self.returns == "list":
            return levels[::-1]
        return {f"level{i}": level for i, level in enumerate(levels)}


def random_case(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    trunk = RandomEncoderDecoder(seed).eval()
    for _ in range(200):
        shape = (rng.randint(1, 2), 2, rng.randint(8, 70), rng.randint(8, 70))
        try:
            ls.tile_plan(trunk, shape, 10_000)
            break
        except ls.NotLocalError:
            raise
        except ValueError:  # the trunk cannot run on this size (e.g. branches of different lengths meet): draw again
            continue
    else:
        raise AssertionError(f"no size found on which this random trunk runs:\n{trunk}")
    tile = tuple(m + rng.choice([0, 0, 1, 3, 9, 30]) for m in minimum_tile(trunk, shape))
    return trunk, shape, tile


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60))
def test_random_encoder_decoders(seed):
    trunk, shape, tile = random_case(seed)
    report = ls.verify(trunk, shape, tile, seed=seed, raise_on_mismatch=False)
    assert report.passed, f"{trunk}\nshape={shape} tile={tile}\n{report}"
    with torch.no_grad():
        expected = trunk.double()(torch.zeros(shape, dtype=torch.float64))
    streamed = ls.stream(trunk, torch.zeros(shape, dtype=torch.float64), tile)
    assert type(streamed) is type(expected)  # the trunk's structure is returned unchanged
