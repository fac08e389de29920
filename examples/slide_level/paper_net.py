"""The streaming paper's Table III network (TUPAC16 and CAMELYON17), split into a streamed
trunk and a conventional head.

Table III, for 2048 x 2048 inputs (22 layers, counting convolutions, max-pools and the
fully connected layer; dropout and ReLU are not counted)::

    2x conv 3x3, 32        max-pool 2x2
    2x conv 3x3, 64        max-pool 2x2
    2x conv 3x3, 128       max-pool 2x2
    2x conv 3x3, 256       max-pool 2x2
    2x conv 3x3, 512       max-pool 2x2     <- repeated once per doubling of the input
                                               in the "equal field of view" experiment
    2x conv 3x3, 512 + BatchNorm   max-pool 2x2
    2x conv 3x3, 512 + BatchNorm   global max-pool
    dropout (p=0.5), fully connected

"Streaming was applied until the final seven layers": the head is the last seven of these
layers (the two BatchNorm blocks, the global max-pool and the fully connected layer), the
trunk is everything before, and holds no BatchNorm, so it is local and can be streamed.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

__all__ = ["HEAD_LAYERS", "extra_blocks_for", "split_layers", "table3_network"]

#: Layers the paper leaves un-streamed ("streaming was applied until the final seven layers").
HEAD_LAYERS = 7

# Output channels of the five blocks before the repeatable one, and of the two last blocks.
_TRUNK_CHANNELS = (32, 64, 128, 256, 512)
_LAST_CHANNELS = 512


def extra_blocks_for(input_size: int, reference_size: int = 2048) -> int:
    """Extra 512-channel blocks that keep the field of view before the global max-pool
    constant as the input grows (the paper's second TUPAC16 experiment: 22, 25 and 28
    layers for 2048, 4096 and 8192 pixels): one per doubling beyond ``reference_size``."""
    if input_size <= 0 or reference_size <= 0:
        raise ValueError(f"sizes must be positive, got input_size={input_size}, reference_size={reference_size}")
    return max(0, round(math.log2(input_size / reference_size)))


def _width(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """One paper layer: 3x3 convolution (padding 1), optional BatchNorm, ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
    layers: list[tuple[str, nn.Module]] = [("conv", conv)]
    if batch_norm:  # a bias before BatchNorm would be cancelled by its mean subtraction
        layers.append(("bn", nn.BatchNorm2d(out_channels)))
    layers.append(("relu", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


def table3_network(
    num_outputs: int,
    *,
    width: float = 1.0,
    extra_blocks: int = 0,
    batch_norm: bool = True,
    dropout: float = 0.5,
    in_channels: int = 3,
) -> nn.Sequential:
    """The Table III network as one ``nn.Sequential`` with one named child per paper layer
    (``block1_conv1``, ..., ``block1_pool``, ..., ``global_pool``, ``fc``), He-initialised.

    Args:
        num_outputs: outputs of the fully connected layer (classes, or regression targets).
        width: multiplier of every layer's channel count (1.0: the paper's 32 ... 512).
        extra_blocks: repeats of the 512-channel block before the BatchNorm blocks (see
            :func:`extra_blocks_for`).
        batch_norm: BatchNorm after each convolution of the last two blocks (TUPAC16);
            False replaces it by nothing (CAMELYON17 used weight decay and LSUV instead).
        dropout: dropout probability before the fully connected layer (0: none).
        in_channels: image channels.

    Returns:
        The network; ``len(network)`` is the paper's layer count (22 + 3 * extra_blocks).
    """
    if num_outputs < 1 or extra_blocks < 0 or not 0 <= dropout < 1 or not width > 0:
        raise ValueError(
            f"need num_outputs >= 1, extra_blocks >= 0, 0 <= dropout < 1, width > 0; got {num_outputs}, "
            f"{extra_blocks}, {dropout}, {width}"
        )
    plain = list(_TRUNK_CHANNELS) + [_TRUNK_CHANNELS[-1]] * extra_blocks
    blocks = [(c, False) for c in plain] + [(_LAST_CHANNELS, batch_norm)] * 2
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for index, (out, norm) in enumerate(blocks, start=1):
        out = _width(out, width)
        layers.append((f"block{index}_conv1", _conv(channels, out, norm)))
        layers.append((f"block{index}_conv2", _conv(out, out, norm)))
        if index < len(blocks):
            layers.append((f"block{index}_pool", nn.MaxPool2d(2)))
        else:  # "2D max-pool, input size": global max pooling
            layers.append(("global_pool", nn.AdaptiveMaxPool2d(1)))
        channels = out
    fc = OrderedDict([("flatten", nn.Flatten())])
    if dropout > 0:
        fc["dropout"] = nn.Dropout(dropout)
    fc["linear"] = nn.Linear(channels, num_outputs)
    layers.append(("fc", nn.Sequential(fc)))
    network = nn.Sequential(OrderedDict(layers))
    _he_init(network)
    return network


def _he_init(network: nn.Module) -> None:
    """He et al. (2015) normal initialisation, as in the paper; zero biases. The final
    linear layer has no ReLU after it, so it gets the linear gain."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def split_layers(network: nn.Sequential, head_layers: int = HEAD_LAYERS) -> tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, head)``: all but the last ``head_layers`` paper layers, and those layers.
    The modules are shared with ``network`` (no copy); child names are kept, so the
    trunk's convolutions are named like ``block1_conv1.conv``."""
    if not 1 <= head_layers < len(network):
        raise ValueError(
            f"head_layers must be in [1, {len(network) - 1}] for this {len(network)}-layer network, got {head_layers}"
        )
    names = list(network._modules)
    cut = len(names) - head_layers
    trunk = nn.Sequential(OrderedDict((name, network._modules[name]) for name in names[:cut]))
    head = nn.Sequential(OrderedDict((name, network._modules[name]) for name in names[cut:]))
    return trunk, head
