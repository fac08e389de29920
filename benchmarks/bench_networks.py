"""Networks, the shared training head and a conventional-memory estimate for the benchmarks."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

# Table III of the paper, first four blocks: (output channels of the two convolutions).
VGG_TRUNK_WIDTHS = (32, 64, 128, 256)


def table1_network(in_channels: int = 3) -> nn.Sequential:
    """The paper's Table I network: three 3x3 convolutions (padding 1) with 3, 64 and 3
    output channels, ReLU between them."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 3, 3, padding=1),
    )  # fmt: skip


def vgg_trunk(in_channels: int = 3, widths: tuple[int, ...] = VGG_TRUNK_WIDTHS) -> nn.Sequential:
    """The first four blocks of the paper's Table III network: per block two 3x3
    convolutions (padding 1), each followed by ReLU, then a 2x2 max pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers += [
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        ]  # fmt: skip
        channels = width
    return nn.Sequential(*layers)


NETWORKS: dict[str, Callable[[], nn.Sequential]] = {"table1": table1_network, "vgg": vgg_trunk}
NETWORK_LABELS = {"table1": "Table I", "vgg": "VGG-like (Table III, 4 blocks)"}


class Head(nn.Module):
    """The tiny head of the training step, identical in both modes: global mean pool of the
    trunk output, then a linear layer to one logit; the loss is that logit. The mean pool
    makes the gradient reaching the trunk output a dense, output-sized tensor, as for a
    real head, without any other full-size tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear = nn.Linear(channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        pooled = features.mean(dim=tuple(range(2, features.dim())))
        return self.linear(pooled).sum()


def build(network: str, seed: int, device: torch.device | str = "cpu") -> tuple[nn.Sequential, Head]:
    """The trunk and head of ``network``, initialised from ``seed``."""
    torch.manual_seed(seed)
    trunk = NETWORKS[network]()
    head = Head(output_channels(trunk))
    return trunk.to(device), head.to(device)


def output_channels(trunk: nn.Sequential) -> int:
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def conventional_step_bytes(trunk: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Estimated peak bytes of a conventional training step (input not requiring grad),
    over the idle process: the input, every tensor autograd saves for the backward, and
    two of the largest activation (a layer's output next to the saved ones during the
    forward; an activation's gradient and its producer's during the backward).

    The estimate runs the trunk on the meta device, so it costs no memory or time.
    """
    meta_trunk = copy.deepcopy(trunk).to("meta")
    parameters = {id(p) for p in meta_trunk.parameters()}
    saved: dict[int, Tensor] = {}
    largest = 0

    def pack(tensor: Tensor) -> Tensor:
        if id(tensor) not in parameters:
            saved[id(tensor)] = tensor
        return tensor

    def record(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        nonlocal largest
        largest = max(largest, _nbytes(output))

    hooks = [m.register_forward_hook(record) for m in meta_trunk.modules() if not list(m.children())]
    x = torch.empty(input_shape, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        meta_trunk(x)
    for hook in hooks:
        hook.remove()
    saved_bytes = sum(_nbytes(t) for t in saved.values() if t is not x)
    return _nbytes(x) + saved_bytes + 2 * largest


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
