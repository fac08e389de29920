"""Streaming in plain PyTorch: check a trunk's exactness, then train on a large image.

Run: ``python examples/stream_demo.py [--size 2048] [--tile 1024]``.

1. ``verify`` runs a trunk streamed and conventionally in float64 on an awkward shape and
   reports the largest relative differences of outputs and every gradient.
2. A training step of the paper's VGG-like network on a ``size`` x ``size`` image: the trunk
   is streamed, the head (global max pooling and a linear layer) runs normally. It prints
   the tile grid, the step time, and the process's peak memory next to an estimate of
   what the conventional step would need.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

import lightning_streaming as ls


def vgg_like_trunk() -> nn.Sequential:
    """The first four blocks of the paper's Table III network (BatchNorm-free)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 64, 128, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers)


def conventional_activation_bytes(trunk: nn.Module, size: int) -> int:
    """Bytes of the activations a conventional training step keeps (float32, batch 1)."""
    total = 0
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        for layer in trunk:
            x = layer(x)
            total += x[0].numel() * (size // 64) ** 2 * 4
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=1024, help="tile side in pixels (halo included)")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("1. Exactness check (float64, 2 x 3 x 517 x 389 input, tile 160):")
    report = ls.verify(vgg_like_trunk(), (2, 3, 517, 389), tile_size=160)
    print(f"   {report.plan}")
    print(f"   worst relative difference over output, input gradient and {len(report.parameter_grads)} "
          f"parameter gradients: {report.worst:.1e} -> {'PASSED' if report.passed else 'FAILED'}")

    trunk, head = vgg_like_trunk(), nn.Linear(256, 2)
    image = torch.rand(1, 3, args.size, args.size)
    label = torch.tensor([1])
    plan = ls.tile_plan(trunk, image.shape, args.tile)
    print(f"\n2. Training step on a {args.size} x {args.size} image with tile {args.tile}:")
    print(f"   {len(plan)} tiles in a {plan.grid[0]} x {plan.grid[1]} grid, largest input region "
          f"{plan.largest_region[0]} x {plan.largest_region[1]}, trunk output {plan.output_shape}")
    baseline = peak_rss_mib()
    start = time.perf_counter()
    features = ls.stream(trunk, image, args.tile)
    forward = time.perf_counter() - start
    logits = head(features.amax(dim=(2, 3)))
    loss = nn.functional.cross_entropy(logits, label)
    loss.backward()
    step = time.perf_counter() - start
    grads = sum(p.grad.abs().sum().item() for p in trunk.parameters())
    print(f"   loss {loss.item():.4f}, forward {forward:.1f} s, forward+backward {step:.1f} s, "
          f"sum |grad| over the trunk {grads:.3e}")
    print(f"   peak memory of this process: {peak_rss_mib():.0f} MiB (before the step: {baseline:.0f} MiB); "
          f"a conventional step would keep about {conventional_activation_bytes(trunk, args.size) / 2**20:.0f} MiB "
          "of activations")


if __name__ == "__main__":
    main()
