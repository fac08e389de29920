"""examples/segmentation.py in miniature: a U-Net streamed as the whole trunk on the real
slide, its whole-slide prediction equal to the conventional forward."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO


def load_example():
    spec = importlib.util.spec_from_file_location("segmentation_example", REPO / "examples" / "segmentation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_segmentation_example_end_to_end(example_slides, tmp_path):
    example = load_example()
    scores = example.main([
        "--spacing", "8", "--crop", "64", "--tile", "48", "--steps", "3", "--depth", "2",
        "--out", str(tmp_path), "--no-progress", "--data", str(REPO / ".data"),
    ])  # fmt: skip
    assert (tmp_path / "prediction.png").stat().st_size > 1000
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["steps"] == 3 and 0 <= written["dice"] <= 1
    assert scores["streamed_vs_conventional_max_abs_difference"] < 1e-4  # float32, several tiles


def test_the_unet_streams_in_several_tiles_at_full_resolution():
    example = load_example()
    import lightning_streaming as ls

    plan = ls.tile_plan(example.UNet(depth=3), (2, 3, 256, 256), 160)
    assert len(plan) > 1 and plan.output_shape == (256, 256)
    report = ls.verify(example.UNet(width=2, depth=2), (1, 3, 72, 56), 48)
    assert report.passed and len(report.plan) > 1
