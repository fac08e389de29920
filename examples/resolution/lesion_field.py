"""A generated task whose label lives in small, high-frequency structures of a large image.

Each image is a large stained "tissue" field at full resolution (``size`` x ``size``, RGB,
float32 in about [0, 1]): a smooth background whose colour drifts over the field, a
mid-frequency stain texture, pixel noise, and a few dark purple "spots", round blobs about
``lesion_blocks * grid`` pixels wide. In a *positive* image one to ``max_lesions`` of the
spots are *lesions*: their inside also carries a fine checkerboard texture (cells of
``cell`` pixels) of zero mean. Negative images have the same number of spots, none
textured. So at low spatial frequencies a lesion is indistinguishable from a distractor
spot: only the fine texture tells the classes apart.

Lower resolutions show the same field of view, area-downsampled by an integer factor
(:func:`downsample`, i.e. the mean of ``factor x factor`` blocks, like reading a coarser
level of a slide pyramid). The construction makes what survives exact:

- every lesion is a union of ``grid x grid`` blocks aligned to the ``grid`` lattice
  (a disc rasterised on that lattice), and the checkerboard's period ``2 * cell`` divides
  ``grid``, so every aligned ``grid x grid`` block of the texture sums to zero. Any
  downsampling factor that is a multiple of ``grid`` therefore removes the texture
  *exactly*, and the downsampled positive image equals the downsampled image of the same
  field without texture;
- with ``cell = 2`` and factor 2, a lesion survives (as a 1-pixel checkerboard at full
  contrast) only when its texture phase is even along both axes (the phase is uniform
  over the period, so with probability 1/4); otherwise every 2 x 2 block holds two
  bright and two dark pixels and the texture vanishes exactly;
- at full resolution every lesion is visible; with the defaults (512 textured pixels per
  lesion, 3 channels, amplitude 0.2, noise 0.04) a matched filter over one lesion has a
  signal-to-noise ratio of about 0.2 * sqrt(1536) / 0.04, i.e. about 200. (The amplitude
  is not what makes the task hard at full resolution: a smaller one, 0.12, is as visible,
  but the network needed more epochs to find it from image-level labels.)

Expected Bayes behaviour (the ideal observer's validation AUC, see :func:`bayes_auc`):
about 1.0 at full resolution; ``0.5 + 0.5 * P(at least one lesion survives)`` at factor 2
(about 0.71 with the defaults: 1 to 3 lesions, each surviving with probability 1/4); and
exactly 0.5 at factor ``grid`` (4) or coarser, where positive and negative images have the
same distribution. A network cannot beat these numbers; whether it reaches them from a
few dozen weakly labelled images is what the experiment measures.

Images are generated from ``(seed, index)`` alone, so a dataset needs no storage and every
epoch, process and resolution sees the same field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

# Colours in RGB, roughly H&E: pink eosin background, purple haematoxylin spots.
BACKGROUND = (0.86, 0.62, 0.76)
SPOT = (-0.30, -0.34, -0.14)  # added to the background at a spot's centre
TEXTURE = (1.0, 1.0, 1.0)  # the lesion texture changes brightness, not hue


@dataclass(frozen=True)
class FieldConfig:
    """Parameters of the generated fields (full-resolution pixels unless stated).

    Args:
        size: side of the full-resolution image; a multiple of ``grid``.
        grid: the lesion lattice: lesions are unions of ``grid x grid`` blocks on it.
            Downsampling by any multiple of ``grid`` removes the texture exactly.
        cell: checkerboard cell side; the texture period ``2 * cell`` must divide ``grid``.
        lesion_blocks: diameter of a spot or lesion, in ``grid`` blocks.
        spots: spots (lesions and distractors) per image.
        max_lesions: a positive image has 1 to ``max_lesions`` lesions (uniform).
        amplitude: the checkerboard's amplitude (brightness), on [0, 1] pixel values.
        noise: standard deviation of the per-pixel Gaussian noise.
    """

    size: int = 1024
    grid: int = 4
    cell: int = 2
    lesion_blocks: int = 6
    spots: int = 10
    max_lesions: int = 3
    amplitude: float = 0.2
    noise: float = 0.04

    def __post_init__(self) -> None:
        if self.grid % (2 * self.cell):
            raise ValueError(f"grid ({self.grid}) must be a multiple of the texture period 2 * cell ({2 * self.cell})")
        if self.size % self.grid:
            raise ValueError(f"size ({self.size}) must be a multiple of grid ({self.grid})")
        if self.size < 4 * self.lesion_blocks * self.grid:
            raise ValueError(f"size ({self.size}) is too small for spots of {self.lesion_blocks * self.grid} px")
        if not 1 <= self.max_lesions <= self.spots:
            raise ValueError(f"max_lesions must be in [1, spots={self.spots}], got {self.max_lesions}")

    @property
    def lesion_diameter(self) -> int:
        """Diameter of a lesion in full-resolution pixels."""
        return self.lesion_blocks * self.grid


@dataclass(frozen=True)
class Spot:
    """A spot: its bounding box's top-left corner (full-resolution pixels, on the ``grid``
    lattice), its texture phase along each axis (``0 .. 2 * cell - 1``), and whether it is
    a lesion (textured) or a distractor."""

    top: int
    left: int
    phase_y: int
    phase_x: int
    lesion: bool


def _generator(seed: int, index: int) -> torch.Generator:
    # Distinct, reproducible streams for every (seed, index) pair.
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _smooth(generator: torch.Generator, size: int, scale: int, channels: int) -> Tensor:
    """Smooth noise in [0, 1]: uniform noise on a grid of ``scale``-pixel spacing,
    bilinearly upsampled to ``size``."""
    coarse = torch.rand(1, channels, size // scale + 2, size // scale + 2, generator=generator)
    fine = F.interpolate(coarse, scale_factor=scale, mode="bilinear", align_corners=False)
    return fine[0, :, :size, :size]


def _block_disc(blocks: int) -> Tensor:
    """A disc of ``blocks`` blocks across, as a (blocks, blocks) bool mask."""
    centre = (torch.arange(blocks) + 0.5 - blocks / 2) ** 2
    return centre[:, None] + centre[None, :] <= (blocks / 2) ** 2 + 0.25


def _checkerboard(side: int, cell: int, phase_y: int, phase_x: int) -> Tensor:
    """A (side, side) +-1 checkerboard with ``cell``-pixel cells, shifted by the phases."""
    ys = ((torch.arange(side) + phase_y) // cell) % 2
    xs = ((torch.arange(side) + phase_x) // cell) % 2
    return 1.0 - 2.0 * (ys[:, None] ^ xs[None, :]).float()


def generate(config: FieldConfig, seed: int, index: int, texture: bool = True) -> tuple[Tensor, int, list[Spot]]:
    """The full-resolution image ``index`` of the dataset with ``seed``.

    Returns ``(image, label, spots)``: a (3, size, size) float32 image, the label (1 when
    it contains lesions; ``index % 2``, so any even-length range is balanced) and its spots,
    lesions first. ``texture=False`` gives the same field with the lesion texture left out
    (identical in every other pixel), for checks.
    """
    g = _generator(seed, index)
    size, label = config.size, index % 2
    colour = torch.tensor(BACKGROUND)[:, None, None]
    # Background: a slow drift of brightness and hue over the field, a mid-frequency stain
    # texture and pixel noise; all drawn the same way for both classes.
    image = colour * (0.85 + 0.3 * _smooth(g, size, 256, 1)) + 0.08 * (_smooth(g, size, 96, 3) - 0.5)
    image += 0.10 * (_smooth(g, size, 8, 1) - 0.5)
    image += config.noise * torch.randn(3, size, size, generator=g)

    # Spots on the grid lattice; in a positive image the first few become lesions.
    diameter, blocks = config.lesion_diameter, size // config.grid
    corners = torch.randint(0, blocks - config.lesion_blocks + 1, (config.spots, 2), generator=g) * config.grid
    lesion_count = int(torch.randint(1, config.max_lesions + 1, (1,), generator=g))
    phases = torch.randint(0, 2 * config.cell, (config.spots, 2), generator=g)
    lesion_count = lesion_count if label else 0

    # A spot's profile: a smooth bump limited to the lesion's blocky disc, the same for
    # lesions and distractors, so at low resolution the two look alike.
    centre = torch.arange(diameter) + 0.5 - diameter / 2
    radius2 = (centre[:, None] ** 2 + centre[None, :] ** 2) / (diameter / 2) ** 2
    mask = _block_disc(config.lesion_blocks).repeat_interleave(config.grid, 0).repeat_interleave(config.grid, 1)
    bump = torch.clamp(1.0 - radius2, min=0.0) ** 0.5 * mask
    spot = torch.tensor(SPOT)[:, None, None] * bump
    spots = []
    for i, ((top, left), (phase_y, phase_x)) in enumerate(zip(corners.tolist(), phases.tolist())):
        spots.append(Spot(top, left, phase_y, phase_x, lesion=i < lesion_count))
        window = image[:, top : top + diameter, left : left + diameter]
        window += spot
        if spots[-1].lesion and texture:
            board = _checkerboard(diameter, config.cell, phase_y, phase_x) * mask
            window += config.amplitude * torch.tensor(TEXTURE)[:, None, None] * board
    return image, label, spots


def downsample(image: Tensor, factor: int) -> Tensor:
    """Area downsampling by an integer ``factor``: the mean of each ``factor x factor`` block
    (the same field of view with ``factor``-times fewer pixels per side). Works on (C, H, W)
    and (N, C, H, W)."""
    if factor == 1:
        return image
    batched = image if image.dim() == 4 else image[None]
    if batched.shape[-1] % factor or batched.shape[-2] % factor:
        raise ValueError(f"image sides {tuple(batched.shape[-2:])} are not multiples of the factor {factor}")
    out = F.avg_pool2d(batched, factor)
    return out if image.dim() == 4 else out[0]


def lesion_survives(lesion: Spot, config: FieldConfig, factor: int) -> bool:
    """Whether a lesion's texture is still present after downsampling by ``factor``.

    Exact for this generator: the lesion's pixels are whole blocks of the ``grid`` lattice,
    so a factor that divides ``grid`` or is a multiple of it never mixes lesion and
    non-lesion texture in one block, and the texture survives when some block mean of the
    (masked) checkerboard is not zero. Other factors are refused.
    """
    if factor % config.grid and config.grid % factor:
        raise ValueError(f"factor {factor} must divide grid ({config.grid}) or be a multiple of it")
    if factor % config.grid == 0:
        return False  # every aligned grid block holds whole periods of the texture
    diameter = config.lesion_diameter
    mask = _block_disc(config.lesion_blocks).repeat_interleave(config.grid, 0).repeat_interleave(config.grid, 1)
    board = _checkerboard(diameter, config.cell, lesion.phase_y, lesion.phase_x) * mask
    return bool(F.avg_pool2d(board[None, None], factor).abs().max() > 1e-6)


def bayes_auc(config: FieldConfig, factor: int) -> float:
    """The ideal observer's AUC at downsampling ``factor``, in the noise-free limit.

    A positive image whose lesions all vanished is distributed exactly like a negative one
    (score ties: half credit); one with a surviving lesion is recognised. So the AUC is
    ``0.5 + 0.5 * P(at least one surviving lesion)``, averaged over the uniform lesion
    count and the uniform texture phases.
    """
    phases = range(2 * config.cell)
    survive = sum(
        lesion_survives(Spot(0, 0, py, px, lesion=True), config, factor) for py in phases for px in phases
    ) / len(phases) ** 2
    counts = range(1, config.max_lesions + 1)
    p_any = sum(1.0 - (1.0 - survive) ** n for n in counts) / len(counts)
    return 0.5 + 0.5 * p_any


class LesionFields(Dataset):
    """``length`` images of the task at downsampling ``factor``, generated on the fly.

    Item ``i`` is ``(image, label)`` with the (3, size / factor, size / factor) float32
    image of :func:`generate` ``(config, seed, i)`` area-downsampled by ``factor``, and a
    float label (for a binary cross-entropy loss). Every factor shows the same fields.

    Args:
        config: the field parameters.
        length: the number of images (even: balanced classes).
        seed: which fields; use different seeds for training and validation.
        factor: area-downsampling factor (1: full resolution); must divide ``config.size``.
    """

    def __init__(self, config: FieldConfig, length: int, seed: int, factor: int = 1) -> None:
        if config.size % factor:
            raise ValueError(f"factor {factor} does not divide the image size {config.size}")
        self.config, self.length, self.seed, self.factor = config, length, seed, factor

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label, _ = generate(self.config, self.seed, index)
        return downsample(image, self.factor), torch.tensor(float(label))
