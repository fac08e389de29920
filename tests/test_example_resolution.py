"""examples/resolution: the generated lesion task (determinism, labels, what downsampling
keeps and removes) and a tiny end-to-end run of the resolution experiment."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "resolution"
sys.path.insert(0, str(EXAMPLE))
import lesion_field as lf  # noqa: E402

SMALL = lf.FieldConfig(size=192)


def load_run():
    """examples/resolution/run.py as a module (its name 'run' is too generic to import)."""
    spec = importlib.util.spec_from_file_location("resolution_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_is_deterministic_per_seed_and_index():
    a, label_a, spots_a = lf.generate(SMALL, seed=3, index=5)
    b, label_b, spots_b = lf.generate(SMALL, seed=3, index=5)
    assert torch.equal(a, b) and label_a == label_b and spots_a == spots_b
    assert a.shape == (3, 192, 192) and a.dtype == torch.float32
    assert not torch.equal(a, lf.generate(SMALL, seed=4, index=5)[0])
    assert not torch.equal(a, lf.generate(SMALL, seed=3, index=7)[0])


def test_labels_match_lesion_presence_and_only_lesions_differ():
    labels = []
    for index in range(8):
        image, label, spots = lf.generate(SMALL, seed=1, index=index)
        plain, plain_label, _ = lf.generate(SMALL, seed=1, index=index, texture=False)
        lesions = [s for s in spots if s.lesion]
        labels.append(label)
        assert len(spots) == SMALL.spots
        assert plain_label == label and (label == 1) == (len(lesions) > 0)
        assert 1 <= len(lesions) <= SMALL.max_lesions or label == 0
        difference = (image - plain).abs().amax(0) > 0
        inside = torch.zeros_like(difference)
        for spot in spots:
            assert spot.top % SMALL.grid == 0 and spot.left % SMALL.grid == 0
        for lesion in lesions:
            d = SMALL.lesion_diameter
            inside[lesion.top : lesion.top + d, lesion.left : lesion.left + d] = True
        # The texture is the only difference between the classes' fields, and only inside lesions.
        assert difference.any() == bool(label)
        assert not (difference & ~inside).any()
    assert labels == [0, 1] * 4  # balanced


def test_dataset_shows_the_same_field_of_view_at_every_factor():
    full, label, _ = lf.generate(SMALL, seed=2, index=1)
    for factor in (1, 2, 4):
        image, y = lf.LesionFields(SMALL, 4, seed=2, factor=factor)[1]
        assert image.shape == (3, 192 // factor, 192 // factor) and float(y) == label
        # Each low-resolution pixel is the mean of the full-resolution block it covers.
        blocks = full.reshape(3, 192 // factor, factor, 192 // factor, factor).mean(dim=(2, 4))
        torch.testing.assert_close(image, blocks)
    with pytest.raises(ValueError, match="does not divide"):
        lf.LesionFields(SMALL, 4, seed=0, factor=5)


def high_frequency_energy(image: torch.Tensor) -> float:
    """Energy of the image minus its 3x3 box blur (a crude high-pass)."""
    blurred = F.avg_pool2d(image[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return float(((image - blurred) ** 2).sum())


def test_downsampling_destroys_the_lesion_signal():
    config = lf.FieldConfig(size=192, noise=0.0)
    survived_at_2 = []
    for index in range(1, 40, 2):  # positives
        image, _, spots = lf.generate(config, seed=0, index=index)
        lesions = [s for s in spots if s.lesion]
        plain, _, _ = lf.generate(config, seed=0, index=index, texture=False)
        signal = image - plain
        assert high_frequency_energy(signal) > 10.0
        # A quarter of the resolution: the texture is gone exactly, positives look like negatives.
        assert lf.downsample(signal, 4).abs().max() < 1e-5
        assert lf.downsample(signal, 8).abs().max() < 1e-5
        # Half the resolution: a lesion survives exactly when lesion_survives says so.
        half = lf.downsample(signal, 2)
        d = config.lesion_diameter // 2
        for lesion in lesions:
            top, left = lesion.top // 2, lesion.left // 2
            present = half[:, top : top + d, left : left + d].abs().max() > 1e-5
            overlapped = any(o is not lesion and abs(o.top - lesion.top) < 2 * d and abs(o.left - lesion.left) < 2 * d
                             for o in lesions)  # fmt: skip
            if not overlapped:
                assert bool(present) == lf.lesion_survives(lesion, config, 2)
            survived_at_2.append(lf.lesion_survives(lesion, config, 2))
    assert any(survived_at_2) and not all(survived_at_2)


def test_ideal_observer_auc():
    assert lf.bayes_auc(SMALL, 1) == 1.0
    assert lf.bayes_auc(SMALL, 4) == 0.5 and lf.bayes_auc(SMALL, 8) == 0.5
    # Factor 2: a lesion survives with probability 1/4 (even phase on both axes), 1-3 lesions.
    p_any = sum(1 - 0.75**n for n in (1, 2, 3)) / 3
    assert lf.bayes_auc(SMALL, 2) == pytest.approx(0.5 + 0.5 * p_any)
    with pytest.raises(ValueError, match="divide grid"):
        lf.bayes_auc(SMALL, 3)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of the texture period"):
        lf.FieldConfig(grid=4, cell=4)
    with pytest.raises(ValueError, match="multiple of grid"):
        lf.FieldConfig(size=1022)


def test_tiny_end_to_end_run_writes_table_and_plot(tmp_path):
    run = load_run()
    out = tmp_path / "res"
    argv = ["--size", "128", "--factors", "2", "1", "--tile", "96", "--epochs", "1", "--train-images", "4",
            "--val-images", "4", "--batch-size", "2", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    rows = run.main(argv)
    assert [r["side"] for r in rows] == [64, 128]
    assert rows[-1]["tiles"] > 1  # the top resolution is streamed in several tiles
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    table = (out / "resolution.md").read_text()
    assert "--tile 96" in table
    lines = [line for line in table.splitlines() if line.startswith("| 128²")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[4].startswith(str(rows[-1]["tiles"])) and 0.0 <= float(cells[6]) <= 1.0
    assert re.match(r"\d+ s", cells[5])
    for name in ("auc_vs_resolution.png", "lesion_examples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "resolution.json").read_text())["rows"][0]["factor"] == 2
