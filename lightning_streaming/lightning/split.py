"""Split an existing network into a streamed trunk and a conventional head at a named child."""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn


def split_at(network: nn.Module, last: str) -> tuple[nn.Sequential, nn.Module]:
    """Split ``network`` after its direct child ``last`` into ``(trunk, head)``.

    The trunk is an :class:`~torch.nn.Sequential` of the children up to and including
    ``last``, under their own names (so ``trunk.layer1.0.conv1.weight`` keeps its
    path). The head is a shallow copy of ``network`` in which those children are
    :class:`~torch.nn.Identity`: it runs the network's own ``forward`` (with its
    ``torch.flatten`` and other functional steps) on the trunk's output. Both share the
    parameters of ``network``, which itself is left unchanged.

    This is exact for networks whose ``forward`` applies the trunk's children once each,
    in the order they were declared, before anything else, as torchvision's ResNet,
    VGG-style ``features`` stacks and most CNN backbones do. Check a network of another
    shape by comparing ``head(trunk(x))`` with ``network(x)`` once.

    Args:
        network: the network to split, e.g. a torchvision ``resnet50()``.
        last: name of the last direct child that belongs to the trunk, e.g. ``"layer2"``.

    Returns:
        ``(trunk, head)`` with ``head(trunk(x)) == network(x)``.

    Example::

        trunk, head = ls.split_at(torchvision.models.resnet18(), "layer2")
        # trunk: conv1, bn1, relu, maxpool, layer1, layer2; head: layer3, layer4, avgpool, flatten, fc
    """
    names = [name for name, _ in network.named_children()]
    if last not in names:
        raise ValueError(
            f"{type(network).__name__} has no direct child {last!r}; its children are {names}. Name the last "
            "child that belongs to the trunk"
        )
    trunk_names = names[: names.index(last) + 1]
    trunk = nn.Sequential(OrderedDict((name, network.get_submodule(name)) for name in trunk_names))
    head = copy.copy(network)
    # A shallow copy shares its dicts of submodules, parameters and buffers with the original: copy them.
    head._modules = OrderedDict(network._modules)
    head._parameters = OrderedDict(network._parameters)
    head._buffers = OrderedDict(network._buffers)
    for name in trunk_names:
        head._modules[name] = nn.Identity()
    return trunk, head

