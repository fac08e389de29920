"""Whether tiles may run together as one batch: only if the trunk treats the images of a
batch independently.

Tile batching concatenates the regions of equal-shaped tiles along the batch dimension,
so an image's result must not depend on the other entries of its batch. The geometry
analysis cannot say (it treats the batch like channels: values that may be mixed freely
at each pixel, which streaming one tile at a time allows). So the trunk is analysed once
more with the batch turned into a spatial dimension: a wrapper moves it behind the
channels. Mixing the batch is then mixing positions along that dimension, which the
analysis refuses with its usual message (a reduction, a flip, an indexing, a product over
it), and an accepted trunk is batch-independent exactly when that dimension's window is
the identity.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import NotLocalError
from .graph import TrunkGeometry, geometry_of

_CHECK_LENGTHS = (1, 2, 3, 5)


class _BatchAsSpace(nn.Module):
    """``trunk`` on ``(1, C, N, *spatial)`` inputs: the batch as the first spatial dimension."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: Tensor) -> Any:
        # "* 1" gives every value a tensor of its own, so no view of a value the trunk wrote in place is
        # analysed (the analysis refuses views of a feature map after an in-place write).
        out = self.trunk(x.movedim(2, 0).squeeze(1) * 1)
        return pytree.tree_map(lambda t: (t * 1).unsqueeze(0).movedim(1, 2) if isinstance(t, Tensor) else t, out)


def batch_mixing(module: nn.Module, geometry: TrunkGeometry, channels: int) -> str | None:
    """Why ``module``'s result for one image may depend on another image of its batch, or
    None when it cannot (cached with ``geometry``)."""
    cache = geometry.__dict__.setdefault("_batch_mixing", {})
    if channels not in cache:
        cache[channels] = _analyse(module, geometry.spatial_dims, channels)
    return cache[channels]


def _analyse(module: nn.Module, spatial_dims: int, channels: int) -> str | None:
    try:
        batched = geometry_of(_BatchAsSpace(module), spatial_dims + 1, channels, batch=1)
    except NotLocalError as error:
        return f"the trunk mixes the images of a batch (spatial dimension s0 here is the batch): {error}"
    except Exception as error:  # anything the batch-as-space form cannot express: do not batch
        return f"the trunk could not be analysed with the batch as a dimension ({type(error).__name__}: {error})"
    if any(c.dim == 0 for c in batched.conditions):
        return "the trunk's code depends on the batch size"
    for length in _CHECK_LENGTHS:
        lengths = batched.lengths(0, length)
        if lengths is None or any(lengths[node] != length for node in batched.outputs):
            return f"the trunk changes the batch size (a batch of {length} gives another number of results)"
        for index in range(length):
            for node in batched.outputs:
                if batched.needed(0, {node: (index, index)}, lengths) != (index, index):
                    return f"a result of image {index} of a batch of {length} reads other images"
    return None
