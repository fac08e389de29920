"""Many random local trunks, random awkward sizes, random tiles: streamed equals conventional."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import lightning_streaming as ls
from trunks import minimum_tile


class Residual(nn.Module):
    """Main path with any odd kernel, dilation and stride; 1x1 strided shortcut (ResNet style)."""

    def __init__(self, channels: int, kernel: int, dilation: int, stride: int):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.main = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, stride, pad, dilation=dilation), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )  # fmt: skip
        self.shortcut = nn.Conv2d(channels, channels, 1, stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        return torch.relu(self.main(x) + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Conv2d(channels, 2, 3, padding=1)
        self.merge = nn.Conv2d(channels + 2, channels, 1)

    def forward(self, x):
        return self.merge(torch.cat([x, torch.tanh(self.branch(x))], dim=1))


def random_layer(rng: random.Random, channels: int) -> nn.Module:
    kind = rng.choice(["conv", "conv", "pool", "residual", "concat", "act", "pad"])
    if kind == "conv":
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        return nn.Conv2d(
            channels, channels, kernel, stride=(rng.randint(1, 2), rng.randint(1, 3)),
            padding=(rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2)),
            dilation=(rng.randint(1, 2), rng.randint(1, 2)),
            padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate"]),
        )  # fmt: skip
    if kind == "pool":
        kernel = rng.randint(2, 3)
        pool = rng.choice([nn.MaxPool2d, nn.AvgPool2d])
        return pool(kernel, rng.randint(1, kernel), padding=rng.randint(0, kernel // 2), ceil_mode=rng.random() < 0.5)
    if kind == "residual":
        return Residual(channels, rng.choice([1, 3, 5]), rng.randint(1, 2), rng.randint(1, 2))
    if kind == "concat":
        return Concat(channels)
    if kind == "pad":
        return rng.choice([nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d])(tuple(rng.randint(0, 2) for _ in range(4)))
    return rng.choice([nn.ReLU(), nn.GELU(), nn.Tanh(), nn.LeakyReLU(0.2)])


def random_case(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    channels = rng.randint(1, 3)
    layers = [nn.Conv2d(2, channels, 3, padding=1)] + [random_layer(rng, channels) for _ in range(rng.randint(2, 6))]
    trunk = nn.Sequential(*layers)
    while True:
        shape = (rng.randint(1, 3), 2, rng.randint(12, 90), rng.randint(12, 90))
        try:
            ls.tile_plan(trunk, shape, 10_000)
            break
        except ValueError:  # the random trunk cannot run on this size; draw another
            continue
    tile = tuple(m + rng.choice([0, 0, 1, 5, 17, 60]) for m in minimum_tile(trunk, shape))
    return trunk, shape, tile


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200))
def test_random_trunks(seed):
    trunk, shape, tile = random_case(seed)
    report = ls.verify(trunk, shape, tile, seed=seed, raise_on_mismatch=False)
    assert report.passed, f"{trunk}\nshape={shape} tile={tile}\n{report}"
