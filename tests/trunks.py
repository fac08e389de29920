"""Trunks for tests, written after torchvision's ResNet, DenseNet and ConvNeXt (torchvision
itself cannot be installed beside the pinned CPU torch here)."""

from __future__ import annotations

import torch
from torch import nn


def table1_network(channels: int = 3) -> nn.Sequential:
    """The paper's Table I network: three 3x3 convolutions with 3, 64 and 3 output channels."""
    return nn.Sequential(
        nn.Conv2d(channels, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 3, 3, padding=1),
    )  # fmt: skip


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc)."""

    def __init__(self, block: type, layers: list[int], width: int = 64, num_classes: int = 10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():  # non-trivial BatchNorm statistics, so eval-mode BN is tested for real
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_trunk(block: type = BasicBlock, layers: list[int] | None = None, width: int = 8, depth: int = 2) -> nn.Sequential:
    """The first ``depth`` stages of a small ResNet, BatchNorm frozen (eval mode)."""
    net = ResNet(block, layers or [2, 2, 2, 2], width=width)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    return nn.Sequential(*stages[: 4 + depth]).eval()


def resnet50_trunk() -> nn.Sequential:
    """Everything of a ResNet-50 before global pooling."""
    net = ResNet(Bottleneck, [3, 4, 6, 3], width=64)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4).eval()


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * growth, 1)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.conv1(x)))


class DenseBlock(nn.Module):
    """DenseNet style: every layer sees the channel concatenation of all earlier outputs."""

    def __init__(self, channels: int = 4, growth: int = 3, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(channels + i * growth, growth) for i in range(layers))
        self.transition = nn.Sequential(
            nn.Conv2d(channels + layers * growth, 6, 1), nn.AvgPool2d(2, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return self.transition(torch.cat(features, 1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: per-pixel normalisation over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: depthwise 7x7, channels-last LayerNorm and MLP, layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


def convnext_trunk(dim: int = 8) -> nn.Sequential:
    """A ConvNeXt stem and stage, with a downsampling layer as in torchvision."""
    return nn.Sequential(
        nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim),
        ConvNeXtBlock(dim), ConvNeXtBlock(dim),
        LayerNorm2d(dim), nn.Conv2d(dim, 2 * dim, 2, stride=2),
        ConvNeXtBlock(2 * dim),
    )  # fmt: skip


def minimum_tile(trunk: nn.Module, shape: tuple) -> tuple[int, ...]:
    """The smallest usable tile for an input of ``shape`` (TileTooSmallError states it)."""
    import lightning_streaming as ls

    try:
        ls.tile_plan(trunk, shape, 1)
    except ls.TileTooSmallError as error:
        return error.minimum_tile
    return (1,) * (len(shape) - 2)
