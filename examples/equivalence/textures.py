"""Real labelled texture images from scikit-image's wheel, and the paper's crops of them.

The five pictures (see the package docstring for why these) are fetched once with
``pip download`` of one pinned scikit-image wheel (no scikit-image install, no other
network access), read straight from the wheel's zip, checked against their SHA-256 and
cached, by :func:`lightning_streaming.fetch_package_files`, as the example slides are.

Each picture becomes a greyscale 512 x 512 centre crop cut into a 4 x 4 grid of 128 x 128
cells: the top three rows are the class's training images, the bottom row its tuning
images, so no tuning pixel is ever seen in training. As in the paper's section V-A,
training samples are random-resized crops (8%-100% of a cell's area, aspect ratio
3/4-4/3, Szegedy et al.) resized to the input size, drawn afresh every epoch; tuning
samples are whole cells resized to the input size (a square cell's centre crop is the
cell). Crops are seeded by (seed, epoch, index), so two runs see identical batches.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

import lightning_streaming as ls

__all__ = [
    "TEXTURES",
    "TextureImages",
    "fetch_textures",
    "load_textures",
    "random_resized_box",
    "TrainingCrops",
    "TuningCells",
]

SKIMAGE_REQUIREMENT = "scikit-image==0.26.0"
# One exact wheel whatever the local interpreter or platform: pip downloads a wheel for the
# named platform without installing it, and every 0.26.0 wheel carries the same data files.
_WHEEL_OPTIONS = (
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
)  # fmt: skip

#: class name: (member of the wheel, SHA-256 of the member)
TEXTURES: dict[str, tuple[str, str]] = {
    "brick": ("skimage/data/brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    "grass": ("skimage/data/grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    "gravel": ("skimage/data/gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    "stars": ("skimage/data/hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "tissue": ("skimage/data/ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
}

PICTURE_SIDE = 512  # every picture is centre-cropped to this (the smallest is 512 x 512)
CELL_SIDE = 128  # 4 x 4 cells per picture: 12 training and 4 tuning images per class
TUNING_ROWS = 1  # the bottom row of cells


def fetch_textures(cache_dir: str | os.PathLike) -> dict[str, Path]:
    """Fetch (once) the texture pictures into ``cache_dir/skimage`` and return their paths,
    class name to file path in the order of :data:`TEXTURES`. Files already there with the
    right SHA-256 are reused without network access (:func:`lightning_streaming.fetch_package_files`).

    Raises:
        RuntimeError: when pip cannot download the wheel, or a file's checksum differs;
            the message gives the pip command and its error.
    """
    files = {
        Path(member).name: ls.PackageFile(SKIMAGE_REQUIREMENT, member, digest, _WHEEL_OPTIONS)
        for member, digest in TEXTURES.values()
    }
    paths = ls.fetch_package_files(files, Path(cache_dir).expanduser() / "skimage")
    return {name: paths[Path(member).name] for name, (member, _) in TEXTURES.items()}


class TextureImages:
    """The pictures as greyscale ``(classes, 512, 512)`` float64 in [0, 1], cut into cells.

    Args:
        pictures: ``(classes, H, W)`` greyscale pictures, H and W multiples of the cell side.
        names: one class name per picture.
        cell: the side of a cell (a training or tuning image) in picture pixels.
        tuning_rows: how many bottom rows of cells are tuning images.
    """

    def __init__(self, pictures: Tensor, names: list[str], cell: int = CELL_SIDE, tuning_rows: int = TUNING_ROWS):
        classes, height, width = pictures.shape
        if len(names) != classes or height % cell or width % cell or not 0 < tuning_rows < height // cell:
            raise ValueError(
                f"need one name per picture ({len(names)} names, {classes} pictures), sides that are multiples of "
                f"cell={cell} (got {height} x {width}), and 0 < tuning_rows < {height // cell} (got {tuning_rows})"
            )
        self.names = list(names)
        # (classes, rows, cols, cell, cell): cell (r, c) of picture k.
        grid = pictures.reshape(classes, height // cell, cell, width // cell, cell).transpose(2, 3)
        split = height // cell - tuning_rows
        self.training = grid[:, :split].reshape(classes, -1, cell, cell)
        self.tuning = grid[:, split:].reshape(classes, -1, cell, cell)
        # Normalised with the training cells' mean and std, as the paper's ImageNet statistics.
        self.mean = float(self.training.mean())
        self.std = float(self.training.std())

    @property
    def classes(self) -> int:
        return len(self.names)


def load_textures(cache_dir: str | os.PathLike) -> TextureImages:
    """Fetch if needed, decode and cut the five texture pictures (see :func:`fetch_textures`)."""
    from PIL import Image  # Pillow comes with matplotlib, which the examples already need

    pictures = []
    for path in fetch_textures(cache_dir).values():
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float64) / 255.0  # ITU-R 601 luma for colour pictures
        top, left = (grey.shape[0] - PICTURE_SIDE) // 2, (grey.shape[1] - PICTURE_SIDE) // 2
        pictures.append(torch.from_numpy(grey[top : top + PICTURE_SIDE, left : left + PICTURE_SIDE].copy()))
    return TextureImages(torch.stack(pictures), list(TEXTURES))


def random_resized_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10,
) -> tuple[int, int, int, int]:  # fmt: skip
    """A random ``(top, left, height, width)`` box covering ``scale`` of the area with aspect
    ratio (width / height) in ``ratio``, log-uniformly (Szegedy et al., as torchvision's
    RandomResizedCrop); after ``attempts`` misses, the largest centred box within ``ratio``."""
    area = height * width
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def _to_input(crop: Tensor, size: int, images: TextureImages, dtype: torch.dtype) -> Tensor:
    """A greyscale crop resized to ``size`` x ``size``, normalised, as three channels (the
    network takes RGB, as for ImageNet; the original code expands grey images the same way)."""
    resized = F.interpolate(crop[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((resized[0] - images.mean) / images.std).expand(3, size, size).to(dtype).contiguous()


class TrainingCrops(Dataset):
    """Training samples: for key ``(index, epoch)``, a random-resized crop of training cell
    ``index % cells`` of class ``index // cells``, seeded by ``(seed, epoch, index)``.

    Use with :class:`lightning_streaming.EpochSampler`, which yields such keys and which
    Lightning reshuffles every epoch.

    Args:
        images: the cut pictures.
        size: the network's input side in pixels.
        seed: the augmentation seed.
        dtype: the sample dtype (float32 or float64).
    """

    def __init__(self, images: TextureImages, size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        self.images, self.size, self.seed, self.dtype = images, size, seed, dtype
        self.cells = images.training.shape[1]

    def __len__(self) -> int:
        return self.images.classes * self.cells

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        label, cell = divmod(index, self.cells)
        picture = self.images.training[label, cell]
        top, left, h, w = random_resized_box(*picture.shape, np.random.default_rng([self.seed, epoch, index]))
        return _to_input(picture[top : top + h, left : left + w], self.size, self.images, self.dtype), label


class TuningCells(Dataset):
    """Tuning samples: every tuning cell, whole, resized to the input size, class-major."""

    def __init__(self, images: TextureImages, size: int, dtype: torch.dtype = torch.float32):
        self.images, self.size, self.dtype = images, size, dtype
        self.cells = images.tuning.shape[1]

    def __len__(self) -> int:
        return self.images.classes * self.cells

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label, cell = divmod(index, self.cells)
        return _to_input(self.images.tuning[label, cell], self.size, self.images, self.dtype), label
