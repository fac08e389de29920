"""Streamed saliency, heatmap pooling and the GeoJSON regions: exact against conventional
computations in float64, on awkward sizes and tiles, uint8 and lazy inputs included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from trunks import resnet_trunk

import lightning_streaming as ls
from lightning_streaming.inference.geojson import _fill, mask_polygons
from lightning_streaming.inference.geometry import HeatmapGrid, Pooler
from lightning_streaming.inference.saliency import streamed_saliency


def dilated_trunk() -> nn.Sequential:
    """Stride, dilation, a pool with ceil_mode: regions overlap unevenly."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 5, padding=2), nn.ReLU(),
        nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(6, 4, 3, padding=1),
    ).double()  # fmt: skip


def normalise(tile: torch.Tensor) -> torch.Tensor:
    return (tile.double() / 255 - 0.4) / 0.3


def conventional(trunk: nn.Module, pixels: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> np.ndarray:
    """The input gradient of sum(grad_output * trunk(pixels)), reduced the same way."""
    pixels = pixels.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(trunk(pixels), pixels, grad_output)
    reduced = gradient.abs().amax(dim=1) if reduction == "max_abs" else gradient.pow(2).sum(dim=1).sqrt()
    return reduced.numpy()


def streamed(trunk, image, tile, grad_output, reduction, transform=None) -> tuple[np.ndarray, int]:
    """The streamed values assembled from the sink's blocks (each pixel exactly once)."""
    n, _, h, w = image.shape
    found = np.zeros((n, h, w))
    count = np.zeros((h, w), dtype=np.int64)
    blocks = []

    def sink(row, col, values):
        found[:, row : row + values.shape[1], col : col + values.shape[2]] = values
        count[row : row + values.shape[1], col : col + values.shape[2]] += 1
        blocks.append(values.shape)

    streamed_saliency(trunk, image, tile, grad_output, sink, reduction=reduction, transform=transform)
    assert (count == 1).all(), "every pixel is delivered exactly once"
    return found, len(blocks)


CASES = [
    # trunk, image shape, tile: awkward sizes, several overlapping tiles per axis
    (lambda: resnet_trunk(depth=1).double(), (2, 3, 75, 61), 50),
    (dilated_trunk, (1, 3, 97, 83), 33),
    (dilated_trunk, (1, 3, 64, 129), 29),  # small tiles: a pixel lies in three tiles' regions along an axis
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("reduction", ["max_abs", "l2"])
def test_streamed_saliency_equals_the_reduced_conventional_gradient(case, reduction):
    make, shape, tile = CASES[case]
    torch.manual_seed(case)
    trunk = make()
    image = torch.randn(shape, dtype=torch.float64)
    grad_output = torch.randn_like(trunk(image))
    plan = ls.tile_plan(trunk, shape, tile)
    assert len(plan) >= 4
    found, blocks = streamed(trunk, image, tile, grad_output, reduction)
    np.testing.assert_allclose(found, conventional(trunk, image, grad_output, reduction), rtol=1e-12, atol=1e-15)
    assert blocks > len(plan)  # finished in pieces, as tiles pass, not once at the end


def test_three_tiles_share_a_pixel_in_the_small_tile_case():
    _, shape, tile = CASES[2]
    segments = ls.tile_plan(dilated_trunk(), shape, tile).segments[1]
    assert any(sum(s.start <= x < s.stop for s in segments) >= 3 for x in range(shape[3]))


@pytest.mark.parametrize("lazy", [False, True])
def test_uint8_and_lazy_inputs_give_the_gradient_of_the_normalised_pixels(lazy):
    torch.manual_seed(1)
    trunk = dilated_trunk()
    image = torch.randint(0, 256, (2, 3, 71, 90), dtype=torch.uint8)
    grad_output = torch.randn_like(trunk(normalise(image)))
    source = ls.TensorSource(image) if lazy else image
    found, _ = streamed(trunk, source, 31, grad_output, "max_abs", transform=normalise)
    expected = conventional(trunk, normalise(image), grad_output, "max_abs")
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-15)


def test_memory_is_a_band_not_the_whole_gradient():
    """Held between tiles: summed cells waiting for later tiles. In raster order that is the
    overlap below the current row of tiles (full width) and beside the current tile."""
    trunk = dilated_trunk()
    image = torch.randn(1, 3, 300, 310, dtype=torch.float64)
    grad_output = torch.randn_like(trunk(image))
    plan = ls.tile_plan(trunk, image.shape, 60)
    rows, cols = plan.segments
    overlap_rows = max(a.stop - b.start for a, b in zip(rows, rows[1:]))
    overlap_cols = max(a.stop - b.start for a, b in zip(cols, cols[1:]))
    bound = 3 * (overlap_rows * image.shape[3] + max(s.size for s in rows) * overlap_cols)
    held = streamed_saliency(trunk, image, 60, grad_output, lambda *a: None)
    assert len(plan) >= 25 and 0 < held <= bound < 0.3 * image.numel()


# ---------------------------------------------------------------------------- pooling


def reference_pool(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape, mode: str) -> np.ndarray:
    """Each image pixel in the heatmap pixel of its index; mean or max; 0 where none."""
    out = np.zeros(shape)
    for p in range(shape[0]):
        for q in range(shape[1]):
            chosen = values[np.ix_(rows == p, cols == q)]
            if chosen.size:
                out[p, q] = chosen.mean() if mode == "mean" else chosen.max()
    return out


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("factor", [1.0, 3.0, 2.5])
def test_pooling_in_blocks_equals_pooling_whole(mode, factor):
    rng = np.random.default_rng(0)
    slide = (50, 47)
    grid = HeatmapGrid.covering(slide, 2.0, 2.0 * factor, (4.0, 4.0))
    assert grid.to_level0 == (4.0 * factor, 4.0 * factor)
    # The image shows slide rows 7..37 after 3 rows of padding, and slide columns 0..40.
    rows_slide = np.r_[[-1] * 3, np.arange(7, 37)]
    cols_slide = np.r_[np.arange(0, 40), [-1] * 2]
    rows, cols = grid.index(rows_slide, 0), grid.index(cols_slide, 1)
    values = rng.random((rows.size, cols.size))
    pooler = Pooler(grid, rows, cols, mode)
    for r0, r1 in ((0, 11), (11, 12), (12, rows.size)):  # blocks in any order, of any size
        for c0, c1 in ((17, cols.size), (0, 17)):
            pooler.add(r0, c0, values[r0:r1, c0:c1])
    expected = reference_pool(values, rows, cols, grid.shape, mode)
    np.testing.assert_allclose(pooler.result(), expected, rtol=1e-6, atol=1e-7)


def test_a_coarse_grid_is_spread_evenly_and_averaged():
    grid = HeatmapGrid.covering((40, 30), 1.0, 4.0, (1.0, 1.0))
    rows, cols = grid.index(np.arange(40), 0), grid.index(np.arange(30), 1)
    coarse = np.random.default_rng(1).random((5, 7))
    pooler = Pooler(grid, rows, cols, "mean")
    pooler.add_grid(coarse)
    cell_rows = np.floor((np.arange(40) + 0.5) * 5 / 40).astype(int)
    cell_cols = np.floor((np.arange(30) + 0.5) * 7 / 30).astype(int)
    upsampled = coarse[np.ix_(cell_rows, cell_cols)]  # each image pixel takes its cell's value
    np.testing.assert_allclose(pooler.result(), reference_pool(upsampled, rows, cols, grid.shape, "mean"), rtol=1e-6)


def test_a_heatmap_finer_than_the_input_is_refused():
    with pytest.raises(ValueError, match="heatmap_spacing 1 um/px is finer than the prediction's spacing 2"):
        HeatmapGrid.covering((10, 10), 2.0, 1.0, (1.0, 1.0))


# ---------------------------------------------------------------------------- GeoJSON


def test_mask_polygons_cover_each_region_once_with_holes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((13, 17)) < 0.45
        union = np.zeros_like(mask)
        for polygon in mask_polygons(mask):
            assert all(ring[0] == ring[-1] for ring in polygon)  # closed rings
            region = _fill(polygon, mask.shape)
            assert not (union & region).any()
            union |= region
        assert (union == mask).all()
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    (polygon,) = mask_polygons(ring)
    assert len(polygon) == 2 and sorted(polygon[1][:-1]) == [(2, 2), (2, 3), (3, 2), (3, 3)]  # one hole
