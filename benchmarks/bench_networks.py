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


class ResNetBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions (no bias) with BatchNorm, ReLU in
    place, and the identity (or a strided 1x1 convolution + BatchNorm) added before the
    last ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride on the 3x3 convolution): 1x1,
    3x3 and 1x1 convolutions (no bias) with BatchNorm, four times as many output channels
    as ``planes``, ReLU in place, the identity (or a strided 1x1 convolution + BatchNorm)
    added before the last ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet with torchvision's layout and module names (``conv1`` 7x7/2, ``bn1``,
    ``relu``, ``maxpool`` 3x3/2, ``layer1`` .. ``layer4`` of ``blocks`` blocks each,
    ``avgpool``, ``fc``), written here because torchvision is not installed beside our
    pinned CPU torch. No pretrained weights."""

    def __init__(self, block: type, blocks: tuple[int, ...], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        expansion = getattr(block, "expansion", 1)
        planes = 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if index == 1 else 2
            layer = [block(planes, width, stride)] + [block(width * expansion, width) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            planes = width * expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    """ResNet-18: two BasicBlocks per stage; with ``num_classes=1000`` torchvision's
    11,689,512 parameters."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(ResNetBasicBlock, (2, 2, 2, 2), num_classes, in_channels)


class ResNet50(ResNet):
    """ResNet-50: 3, 4, 6 and 3 Bottlenecks per stage; with ``num_classes=1000``
    torchvision's 25,557,032 parameters."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(ResNetBottleneck, (3, 4, 6, 3), num_classes, in_channels)


def resnet_body(net: ResNet) -> nn.Sequential:
    """The streamed part of a ResNet: everything before global pooling (conv1, bn1, relu,
    maxpool, layer1 .. layer4; total stride 32), as lightstream's ``split_resnet`` cuts it.

    BatchNorm is local only in eval mode, so the trunk is returned in eval mode with frozen
    BatchNorm parameters (lightstream's ``freeze_normalization_layers`` does the same), and
    with seeded, non-trivial running statistics and affine parameters (a fresh BatchNorm
    would be an identity and hide errors in how a library handles it). The seed is the
    caller's: ``build`` seeds before constructing."""
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    randomise_batch_norm(trunk, shift=0.1)
    for module in trunk.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    return trunk.eval()


def resnet18_trunk(in_channels: int = 3) -> nn.Sequential:
    """The ResNet-18 body (see :func:`resnet_body`)."""
    return resnet_body(ResNet18(in_channels=in_channels))


def resnet50_trunk(in_channels: int = 3) -> nn.Sequential:
    """The ResNet-50 body (see :func:`resnet_body`)."""
    return resnet_body(ResNet50(in_channels=in_channels))


def randomise_batch_norm(network: nn.Module, shift: float) -> None:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters (from the
    global RNG): means and biases in ±``shift``, variances in [0.5, 2], weights in [0.5, 1.5]."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-shift, shift)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-shift, shift)


NETWORKS: dict[str, Callable[[], nn.Sequential]] = {
    "table1": table1_network, "vgg": vgg_trunk, "resnet18": resnet18_trunk, "resnet50": resnet50_trunk,
}  # fmt: skip
NETWORK_LABELS = {
    "table1": "Table I", "vgg": "VGG-like (Table III, 4 blocks)", "resnet18": "ResNet-18 trunk (conv1..layer4)",
    "resnet50": "ResNet-50 trunk (conv1..layer4)",
}  # fmt: skip


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
