"""Reading slides by spacing (real Aperio slide, generated pyramids) and the errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_streaming as ls
from lightning_streaming.data.slide import _over_white


def assert_area_average(actual: np.ndarray, level: np.ndarray, up: int, down: int) -> None:
    """``actual`` is the area average of ``level`` by the rational factor down/up, rounded
    to the nearest integer (ties either way). The reference repeats each pixel up x up,
    then sums down x down blocks: exact, independent of the implementation under test."""
    big = level.repeat(up, axis=0).repeat(up, axis=1).astype(np.int64)
    h, w = big.shape[0] // down, big.shape[1] // down
    sums = big[: h * down, : w * down].reshape(h, down, w, down, 3).sum(axis=(1, 3))
    assert actual.shape == sums.shape and actual.dtype == np.uint8
    error = np.abs(actual.astype(np.int64) * down * down - sums)  # |actual - exact| in units of 1 / down^2
    assert error.max() * 2 <= down * down


def test_example_slides_are_real_and_cached(example_slides):
    assert example_slides.cmu_small_region.stat().st_size == 1938955
    again = ls.example_slides(example_slides.cmu_small_region.parent)  # cached: checksums only
    assert again == example_slides


def test_a_pinned_file_with_another_checksum_is_refused_and_never_cached(tmp_path):
    """fetch_package_files (behind example_slides) checks every file before it enters the cache."""
    wrong = ls.PackageFile(
        "openslide-python==1.4.7", "openslide_python-1.4.7/tests/fixtures/small.svs", "0" * 64, ("--no-binary", ":all:")
    )
    expected = r"small\.svs from openslide-python==1\.4\.7 has SHA-256 01ab0fea.*expected 0{64}"
    with pytest.raises(RuntimeError, match=expected):
        ls.fetch_package_files({"small.svs": wrong}, tmp_path)
    assert not (tmp_path / "small.svs").exists() and not any(tmp_path.glob(".download-*"))


def test_real_slide_geometry_by_spacing(example_slides):
    slide = ls.Slide(example_slides.cmu_small_region)
    assert slide.base_spacing == (0.499, 0.499) and slide.level_dimensions == ((2967, 2220),)
    assert slide.choose(0.5) == ls.LevelChoice(0.5, 0, (1.0, 1.0), (2967, 2220))  # within 2%: read as is
    choice = slide.choose(8.0)
    assert choice.level == 0 and choice.size == (185, 138) and choice.ratio[0] == pytest.approx(8 / 0.499)
    image = slide.read(8.0)
    assert image.shape == (3, 185, 138) and image.dtype == torch.uint8
    assert 200 < image[:, :10, :10].float().mean() < 255 > image[:, 150:160, 60:70].float().mean()  # glass, tissue


def test_a_pixel_is_the_same_whatever_box_reads_it(example_slides, monkeypatch):
    slide = ls.Slide(example_slides.cmu_small_region, block_size=256)
    whole = slide.read(1.7)  # a ratio of 3.4: blocks, spans and weights all misaligned
    for rows, cols in [((0, 37), (0, 51)), ((101, 390), (17, 300)), ((800, 870), (600, 651))]:
        part = slide.read(1.7, (slice(*rows), slice(*cols)))
        assert torch.equal(part, whole[:, rows[0] : rows[1], cols[0] : cols[1]])
    monkeypatch.setattr("lightning_streaming.data.slide._BAND_BYTES", 100_000)  # many small bands
    assert torch.equal(slide.read(1.7), whole)


def test_pyramid_levels_are_read_exactly_and_resampled_by_area(pyramid):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    slide = ls.Slide(pyramid(image, levels=3, mpp=0.25))
    assert slide.level_count == 3
    assert [slide.level_spacing(i) for i in range(3)] == [(0.25, 0.25), (0.5, 0.5), (1.0, 1.0)]
    level1 = np.asarray(slide.read_array(0.5))
    assert level1.shape == (150, 130, 3)
    np.testing.assert_array_equal(level1, image.reshape(150, 2, 130, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    # 0.6 um/px comes from level 1 (0.5, the nearest finer) by a factor 6/5; 1.5 from level 2 by 3/2
    assert slide.choose(0.6).level == 1 and slide.choose(1.5).level == 2
    assert_area_average(slide.read_array(0.6), level1, 5, 6)
    level2 = slide.read_array(1.0)
    assert_area_average(slide.read_array(1.5), level2, 2, 3)
    assert_area_average(slide.read_array(2.0), level2, 1, 2)


def test_missing_spacing_is_a_clear_error_and_can_be_given(pyramid):
    path = pyramid(np.full((64, 64, 3), 200, np.uint8), levels=1, mpp=None)
    slide = ls.Slide(path)
    assert slide.base_spacing is None
    with pytest.raises(ls.MissingSpacingError, match=r"slide.tiff.*records no pixel spacing.*base_spacing=") as info:
        slide.read(1.0)
    assert info.value.path == str(path)
    assert ls.Slide(path, base_spacing=0.5).size(1.0) == (32, 32)


def test_spacing_finer_than_the_slide_is_refused(example_slides):
    slide = ls.Slide(example_slides.cmu_small_region)
    with pytest.raises(ls.SpacingError, match=r"0.25 um/px is finer than .*cmu_small_region.svs.*not upsampled"):
        slide.read(0.25)
    with pytest.raises(ValueError, match="positive number"):
        slide.size(0)


def test_regions_outside_the_slide_are_refused(example_slides):
    slide = ls.Slide(example_slides.cmu_small_region)
    with pytest.raises(ls.RegionOutOfBoundsError, match=r"rows 180:190 is outside .*cmu_small_region.svs.*185 x 138"):
        slide.read(8.0, (slice(180, 190), slice(0, 10)))
    with pytest.raises(ls.RegionOutOfBoundsError, match="cols -1:5"):
        slide.read(8.0, (slice(0, 10), slice(-1, 5)))


def test_missing_and_unopenable_files_name_the_file_and_the_problem(example_slides, tmp_path):
    with pytest.raises(ls.SlideNotFoundError, match=r"nothere.svs' does not exist") as info:
        ls.Slide(tmp_path / "nothere.svs")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ls.SlideOpenError, match=r"cannot open .*unopenable.tiff.*Unsupported TIFF compression"):
        ls.Slide(example_slides.unopenable_tiff)
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(ls.SlideOpenError, match=r"notes.txt' is not a slide format OpenSlide reads"):
        ls.Slide(text)


def test_undecodable_slide_data_names_the_file_and_region(example_slides):
    slide = ls.Slide(example_slides.unreadable_svs)  # the header is fine
    assert slide.size(0.499) == (16, 16)
    with pytest.raises(ls.SlideReadError, match=r"unreadable.svs.*could not decode level 0 pixels .*damaged"):
        slide.read(0.499)
    good = ls.Slide(example_slides.small_svs)
    assert good.read(0.499).shape == (3, 16, 16)


def test_transparent_pixels_become_white_exactly():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    np.testing.assert_array_equal(_over_white(rgba), [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]])


def test_slides_pickle_and_reopen(example_slides):
    import pickle

    slide = ls.Slide(example_slides.boxes_tiff)
    first = slide.read(800.0)
    copy = pickle.loads(pickle.dumps(slide))
    assert torch.equal(copy.read(800.0), first)


# -- ordinary images ------------------------------------------------------------------------


def test_ordinary_images_are_read_as_one_level_slides(tmp_path):
    from PIL import Image

    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    with pytest.raises(ls.MissingSpacingError, match=r"ordinary PNG image.*base_spacing=0.5.*base_spacing=1 makes"):
        ls.Slide(tmp_path / "photo.png").read(1.0)
    png = ls.Slide(tmp_path / "photo.png", base_spacing=1.0)
    assert png.level_count == 1 and png.size(1.0) == (37, 53)
    np.testing.assert_array_equal(png.read(1.0).permute(1, 2, 0).numpy(), pixels)
    box = png.read(1.0, (slice(5, 9), slice(40, 53)))
    np.testing.assert_array_equal(box.permute(1, 2, 0).numpy(), pixels[5:9, 40:])
    assert png.size(2.0) == (18, 26)  # area-averaged like any slide

    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    jpeg = ls.Slide(tmp_path / "photo.jpg", base_spacing=0.5)
    assert jpeg.read(0.5).shape == (3, 37, 53)

    import tifffile  # an untiled, single-level TIFF with its resolution in centimetres (0.25 um/px)

    tifffile.imwrite(tmp_path / "strips.tif", pixels, photometric="rgb", resolution=(4e4, 4e4),
                     resolutionunit="CENTIMETER")  # fmt: skip
    tiff = ls.Slide(tmp_path / "strips.tif")
    assert tiff.base_spacing == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(tiff.read(0.25).permute(1, 2, 0).numpy(), pixels)


def test_ordinary_images_train_through_a_manifest(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 30, 3), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("slide,label,base_spacing\na.png,0,1\na.png,1,1\n")
    dataset = ls.SlideDataset(tmp_path / "m.csv", 1.0, input_size=32, tissue=ls.TissueDetection(spacing=2.0))
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label == 1 and int(image[:, 16, 16].max()) == 90
