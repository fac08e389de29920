"""examples/equivalence: the Table II network trained conventionally and streamed from one
initialisation gives the same loss curve (float64, tiny settings), on the real texture
images (fetched with pip into .data/ on first use), and the pieces it is built from."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the example is run as `python -m examples.equivalence` from the root
    sys.path.insert(0, str(REPO))

from examples.equivalence import (  # noqa: E402
    Settings,
    TableTwoNet,
    TextureImages,
    TrainingCrops,
    TuningCells,
    compare,
    fetch_textures,
    four_tile_size,
    load_textures,
    random_resized_box,
    write_report,
)
from examples.equivalence.textures import TEXTURES  # noqa: E402

TINY = dict(size=48, epochs=2, batch_size=4, lr=0.05, train_per_class=2, tune_per_class=1, reference=False,
            progress=False)


@pytest.fixture(scope="module")
def textures() -> TextureImages:
    """The five texture pictures from scikit-image's wheel. A failed download fails the test
    (never a skip): the example needs these real files."""
    try:
        return load_textures(REPO / ".data")
    except Exception as error:  # noqa: BLE001 - report any failure as a test failure
        pytest.fail(f"could not set up the texture images in {REPO / '.data'}: {error}", pytrace=False)


@pytest.fixture(scope="module")
def float64_run(textures):
    return compare(Settings(dtype="float64", **TINY), textures)


def test_streamed_loss_curve_equals_conventional_in_float64(float64_run):
    conventional, streamed = float64_run.conventional, float64_run.streamed
    steps = TINY["epochs"] * math.ceil(5 * TINY["train_per_class"] / TINY["batch_size"])
    assert len(conventional.step_losses) == len(streamed.step_losses) == steps
    # The curve moves (training happened), so equal curves are not equal constants.
    assert np.ptp(conventional.step_losses) > 1e-3
    np.testing.assert_allclose(streamed.step_losses, conventional.step_losses, rtol=1e-10, atol=0)
    np.testing.assert_allclose(streamed.tuning_losses, conventional.tuning_losses, rtol=1e-10, atol=0)
    assert streamed.tuning_accuracies == conventional.tuning_accuracies
    worst, scale = float64_run.parameter_difference()
    assert worst < 1e-10 * scale
    moved = max(float((conventional.state[k] - v.double()).abs().max()) for k, v in float64_run.initial.items())
    assert moved > 1e-4  # ...and the parameters trained away from the shared start
    assert float64_run.reference is None  # no higher precision to compare float64 with


def test_the_streamed_run_really_ran_tiles(float64_run):
    size = TINY["size"]
    assert float64_run.plan.grid == (2, 2)
    assert set(float64_run.conventional.trunk_regions) == {(size, size)}
    regions = float64_run.streamed.trunk_regions
    assert all(h < size and w < size for h, w in regions)
    # Per step: every tile's forward, and the backward's recomputation of all but the kept one.
    steps = len(float64_run.streamed.step_losses)
    assert sum(regions.values()) == steps * (4 + 3)


def test_float32_run_is_measured_against_float64_rounding(textures):
    comparison = compare(Settings(dtype="float32", **{**TINY, "epochs": 1, "reference": True}), textures)
    rows = comparison.epoch_rows()
    assert len(rows) == 1 and rows[0]["steps"] == 3
    assert 0 < rows[0]["max_rounding"] < 1e-4  # float32 vs float64, a few steps in: rounding only
    assert rows[0]["max_difference"] < 1e-4


def test_report_has_a_row_per_epoch_a_plot_and_every_step(float64_run, tmp_path):
    paths = write_report(float64_run, tmp_path, "python -m examples.equivalence --dtype float64")
    text = paths["markdown"].read_text()
    assert "`python -m examples.equivalence --dtype float64`" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["1", "2"]
    assert "Target" in text and ": met" in text and "grid 2 x 2" in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = np.loadtxt(paths["csv"], delimiter=",", skiprows=1)
    np.testing.assert_array_equal(steps[:, 2], float64_run.conventional.step_losses)
    np.testing.assert_array_equal(steps[:, 3], float64_run.streamed.step_losses)


def test_a_tile_covering_the_whole_input_is_refused(textures):
    with pytest.raises(ValueError, match="one tile"):
        compare(Settings(tile=TINY["size"], **TINY), textures)


def test_default_tile_is_the_papers_four_tiles():
    trunk = TableTwoNet(5).trunk
    import lightning_streaming as ls

    tile = four_tile_size(trunk, (4, 3, 320, 320))
    assert tile == 168  # the paper's 160 x 160 tiles of a 320 x 320 input, plus the halo
    assert ls.tile_plan(trunk, (4, 3, 320, 320), tile).grid == (2, 2)
    assert ls.tile_plan(trunk, (4, 3, 320, 320), tile - 1).grid != (2, 2)


def test_network_is_table_two():
    model = TableTwoNet(10)
    convs = [m for m in [*model.trunk, *model.head] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.out_channels) for c in convs] == [(7, 16), (3, 32), (3, 64), (3, 128), (3, 256)]
    assert len([m for m in model.trunk if isinstance(m, torch.nn.Conv2d)]) == 2  # the first two blocks
    features = model.head[:-2](model.trunk(torch.zeros(1, 3, 320, 320)))
    assert features.shape == (1, 256, 1, 1)
    # At 320 x 320 the map before the last pool is 10 x 10: the paper's 10x10 max-pool is global.
    assert model.head[:-3](model.trunk(torch.zeros(1, 3, 320, 320))).shape[-2:] == (10, 10)
    assert model(torch.zeros(2, 3, 160, 160)).shape == (2, 10)


def test_textures_are_the_pinned_files(textures):
    paths = fetch_textures(REPO / ".data")  # cached: checksums only
    assert list(paths) == list(TEXTURES) == textures.names
    assert textures.training.shape == (5, 12, 128, 128) and textures.tuning.shape == (5, 4, 128, 128)
    assert 0 <= float(textures.training.min()) and float(textures.training.max()) <= 1
    # Five different pictures: no class's cells equal another's.
    means = textures.training.mean(dim=(1, 2, 3))
    assert len({round(float(m), 4) for m in means}) == 5


def test_a_damaged_cached_file_is_fetched_again(textures, tmp_path):
    folder = tmp_path / "skimage"
    folder.mkdir()
    good = fetch_textures(REPO / ".data")["brick"]
    (folder / good.name).write_bytes(b"not a png")
    assert fetch_textures(tmp_path)["brick"].read_bytes() == good.read_bytes()


def test_cells_split_training_and_tuning_rows():
    rows = torch.arange(512, dtype=torch.float64)[:, None].expand(512, 512)  # pixel value = row
    images = TextureImages(torch.stack([rows, rows + 1000]), ["a", "b"])
    assert images.training.shape == (2, 12, 128, 128) and images.tuning.shape == (2, 4, 128, 128)
    assert float(images.training[0].max()) == 383 and float(images.tuning[0].min()) == 384
    assert float(images.training[1, 5].min()) == 1000 + 128  # cell 5: second row of cells
    with pytest.raises(ValueError, match="tuning_rows"):
        TextureImages(torch.stack([rows]), ["a"], tuning_rows=4)


def test_crops_are_seeded_by_seed_epoch_and_index(textures):
    crops = TrainingCrops(textures, 40, seed=3, dtype=torch.float64)
    image, label = crops[(17, 2)]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float64 and label == 17 // 12
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey over three channels
    assert torch.equal(crops[(17, 2)][0], image)
    assert not torch.equal(crops[(17, 3)][0], image)  # a new crop every epoch
    assert not torch.equal(TrainingCrops(textures, 40, seed=4, dtype=torch.float64)[(17, 2)][0], image)
    assert torch.equal(crops[(17, 2)][0].float(), TrainingCrops(textures, 40, seed=3)[(17, 2)][0])
    tuning = TuningCells(textures, 40)
    assert len(tuning) == 20 and tuning[7][1] == 1


def test_random_resized_boxes_follow_the_papers_ranges():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        top, left, h, w = random_resized_box(128, 128, rng)
        assert 0 <= top and top + h <= 128 and 0 <= left and left + w <= 128
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        areas.append(h * w / 128**2)
    assert 0.08 - 0.01 <= min(areas) < 0.12 and max(areas) > 0.9
    assert 0.45 < np.mean(areas) < 0.6  # uniform in [0.08, 1], less the draws that do not fit
    # No attempt left: the largest centred box whose aspect ratio is allowed.
    assert random_resized_box(100, 300, rng, attempts=0) == (0, 83, 100, 133)
    assert random_resized_box(90, 60, rng, attempts=0) == (5, 0, 80, 60)
