"""Per-tile normalisation of uint8 images, for the streamer's ``transform``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Uint8Normalize"]


class Uint8Normalize:
    """``(x / 255 - mean) / std`` per channel: uint8 pixels to normalised floats.

    Use it as a streamed model's ``tile_transform`` (or ``stream(..., transform=)``): each
    tile is converted on its device just before the trunk, so the image travels and rests
    as uint8 (4x smaller than float32) and the full float image never exists. Pixel-wise,
    hence exact under streaming. A plain callable (not a module): it holds no state that
    a checkpoint should carry, and its constants follow each tile's device.

    Args:
        mean, std: per channel, in [0, 1] units (as :func:`channel_mean_std` returns), not
            on the 0-255 scale (ImageNet's are ``[0.485, 0.456, 0.406]``,
            ``[0.229, 0.224, 0.225]``).
        dtype: the output dtype (float32; float64 for exactness checks).

    Raises:
        ValueError: for means or stds outside [0, 1] (0-255 scale values) or a non-positive
            std; when called on a tile that is not uint8 (already float: normalising it
            again would silently shift and scale it a second time).

    Example::

        class Model(ls.StreamingMixin, pl.LightningModule):
            def __init__(self, mean, std):
                super().__init__()
                self.save_hyperparameters()
                self.tile_transform = ls.Uint8Normalize(mean, std)
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> None:
        mean_t = torch.as_tensor(list(mean), dtype=torch.float64)
        std_t = torch.as_tensor(list(std), dtype=torch.float64)
        if mean_t.shape != std_t.shape or mean_t.dim() != 1 or not bool((std_t > 0).all()):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {list(mean)} and {list(std)}")
        if bool((mean_t > 1).any() or (mean_t < 0).any() or (std_t > 1).any()):
            scaled = [round(v / 255, 4) for v in mean_t.tolist()], [round(v / 255, 4) for v in std_t.tolist()]
            raise ValueError(
                f"Uint8Normalize takes mean and std in [0, 1] units (pixel value / 255), got mean {list(mean)} and std "
                f"{list(std)}, which look like 0-255 values. Divide them by 255: Uint8Normalize({scaled[0]}, "
                f"{scaled[1]}), or compute them with ls.channel_mean_std"
            )
        self.mean, self.std, self.dtype = [float(v) for v in mean_t], [float(v) for v in std_t], dtype
        # (x / 255 - mean) / std == x * scale + shift
        self._constants = {torch.device("cpu"): ((1 / (255 * std_t)).to(dtype), (-mean_t / std_t).to(dtype))}

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise ValueError(
                f"Uint8Normalize converts uint8 pixels (0-255) but got a {x.dtype} tile: normalising it would "
                "divide by 255 again. Keep the images uint8 up to the model (SlideDataset does), or, for images "
                "that are already float, use a float normalisation as tile_transform, e.g. lambda x: (x - mean) / "
                "std with tensors shaped (1, C, 1, 1)"
            )
        if x.dim() < 2 or x.shape[1] != len(self.mean):
            raise ValueError(
                f"Uint8Normalize has {len(self.mean)} channels but got a tile of shape {tuple(x.shape)} (N, C, ...)"
            )
        if x.device not in self._constants:
            scale, shift = self._constants[torch.device("cpu")]
            self._constants[x.device] = (scale.to(x.device), shift.to(x.device))
        scale, shift = self._constants[x.device]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # In place on the converted copy: one float tile at a time, not two.
        return x.to(self.dtype).mul_(scale.view(shape)).add_(shift.view(shape))

    def __repr__(self) -> str:
        return f"Uint8Normalize(mean={[round(m, 4) for m in self.mean]}, std={[round(s, 4) for s in self.std]})"
