"""Tissue detection, masks saved and loaded, cropping to the tissue and removing empty rows/columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_streaming as ls


@pytest.fixture(scope="module")
def cmu_mask(example_slides):
    return ls.detect_tissue(ls.Slide(example_slides.cmu_small_region), spacing=8.0)


def two_islands() -> np.ndarray:
    """White glass with two dark tissue squares separated by a wide empty band, and a speck."""
    image = np.full((256, 320, 3), 240, np.uint8)
    image[32:96, 40:104] = (150, 80, 160)
    image[160:224, 200:288] = (120, 60, 140)
    image[10, 300] = (0, 0, 0)  # a dust speck, one pixel
    return image


def test_tissue_on_the_real_slide(cmu_mask, example_slides):
    slide = ls.Slide(example_slides.cmu_small_region)
    assert cmu_mask.mask.shape == slide.size(8.0) and cmu_mask.mask.dtype == torch.bool
    assert 0.3 < cmu_mask.fraction < 0.55  # the strip of skin; the rest is glass
    assert not cmu_mask.mask[:20, :20].any() and cmu_mask.mask[150:160, 60:70].all()
    rows, cols = cmu_mask.bounding_box(2.0, slide.size(2.0))
    height, width = slide.size(2.0)
    assert 0 < rows.start < 100 and rows.stop == height and 50 < cols.start < cols.stop < width  # glass cut away
    otsu = ls.detect_tissue(slide, 8.0, threshold="otsu")
    assert 150 < otsu.threshold < 230 and abs(otsu.fraction - cmu_mask.fraction) < 0.1


def test_mask_saves_and_loads(cmu_mask, tmp_path):
    path = cmu_mask.save(tmp_path / "cmu.tissue.npz")
    loaded = ls.TissueMask.load(path)
    assert torch.equal(loaded.mask, cmu_mask.mask) and loaded.spacing == 8.0
    assert loaded.settings == cmu_mask.settings and loaded.threshold == cmu_mask.threshold


def test_bounding_box_and_empty_band_removal(pyramid):
    slide = ls.Slide(pyramid(two_islands(), levels=2, mpp=1.0))
    mask = ls.detect_tissue(slide, spacing=2.0, blur=0, opening=4.0)
    assert not mask.mask[5, 150]  # the speck (at 2 um/px: row 5, col 150) was opened away
    assert mask.bounding_box(1.0) == (slice(32, 224), slice(40, 288))
    box = ls.Layout.from_mask(mask, 1.0, slide.size(1.0))
    assert box.rows == ((32, 224),) and box.cols == ((40, 288),)
    compact = ls.Layout.from_mask(mask, 1.0, slide.size(1.0), remove_empty=True, margin=1)
    assert compact.rows == ((30, 98), (158, 226)) and compact.cols == ((38, 106), (198, 290))
    source = ls.SlideRegionSource(slide, 1.0, compact)
    assert source.shape == (1, 3, 136, 160)
    image = ls.read_all(source)[0]
    whole = slide.read(1.0)
    torch.testing.assert_close(image[:, :68, :68], whole[:, 30:98, 38:106], rtol=0, atol=0)
    torch.testing.assert_close(image[:, 68:, 68:], whole[:, 158:226, 198:290], rtol=0, atol=0)
    # read box by box across the seams: the same pixels
    part = source.read((slice(50, 100), slice(60, 120)))
    assert torch.equal(part[0], image[:, 50:100, 60:120])
    assert compact.to_image(160, 200) == (68 + 2, 68 + 2) and compact.to_image(120, 200) is None


def test_blank_slide_has_no_tissue_and_the_layout_keeps_everything(pyramid):
    slide = ls.Slide(pyramid(np.full((64, 64, 3), 245, np.uint8), levels=1, mpp=1.0))
    mask = ls.detect_tissue(slide, 4.0)
    assert mask.empty and mask.bounding_box(1.0) is None
    assert ls.Layout.from_mask(mask, 1.0, (64, 64)) == ls.Layout.full((64, 64))


def test_bad_settings_are_refused(example_slides):
    slide = ls.Slide(example_slides.small_svs)
    with pytest.raises(ValueError, match="threshold must be a grey level in 0..255 or 'otsu'"):
        ls.detect_tissue(slide, 1.0, threshold="auto")
    with pytest.raises(ValueError, match="blur must be"):
        ls.detect_tissue(slide, 1.0, blur=-1)
    with pytest.raises(ValueError, match="ascending, disjoint"):
        ls.Layout(((10, 20), (15, 30)), ((0, 5),))


def test_a_saved_mask_in_the_manifest_replaces_detection(cmu_mask, example_slides, tmp_path):
    slide = ls.Slide(example_slides.cmu_small_region)
    edited = ls.TissueMask(torch.zeros_like(cmu_mask.mask), 8.0, cmu_mask.threshold)
    edited.mask[100:120, 40:60] = True  # keep one small region only
    edited.save(tmp_path / "edited.npz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,label,tissue_mask\n{slide.path},1,edited.npz\n")
    dataset = ls.SlideDataset(manifest, 4.0, num_classes=2)
    assert dataset.manifest.target_columns == ("label",)
    assert dataset.layout(0) == ls.Layout(((200, 240),), ((80, 120),))
    assert dataset[0][0].shape == (3, 40, 40)
    manifest.write_text(f"slide,label,tissue_mask\n{slide.path},1,lost.npz\n")
    with pytest.raises(ls.SlideNotFoundError, match=r"m.csv:2: tissue mask .*lost.npz' does not exist"):
        ls.SlideDataset(manifest, 4.0, num_classes=2)
