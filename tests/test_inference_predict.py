"""Whole-slide prediction, heatmaps in slide coordinates, checkpoints, outputs, errors and the
command line: float64 against the conventional computation on the tissue image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import write_pyramid
from inference_models import AttentionNet, OtherNet, SlideNet
from test_inference_saliency import reference_pool

import lightning_streaming as ls
from lightning_streaming.inference.cam import grad_cam
from lightning_streaming.inference.geometry import HeatmapGrid

TESTS = Path(__file__).resolve().parent
MEAN, STD = [0.7, 0.6, 0.7], [0.2, 0.25, 0.2]
TISSUE = ls.TissueDetection(spacing=2.0, blur=2.0, opening=0.0)
SPACING, HEATMAP_SPACING = 1.5, 4.0  # 0.5 um/px slide: resampled reads, heatmap pixels of 2.67 image pixels


def tissue_image(height: int = 260, width: int = 300, seed: int = 0) -> np.ndarray:
    """Glass (about 240) with a textured dark 'tissue' block."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 240, dtype=np.uint8)
    r0, r1, c0, c1 = int(0.27 * height), int(0.8 * height), int(0.17 * width), int(0.77 * width)
    image[r0:r1, c0:c1] = rng.integers(60, 200, size=(r1 - r0, c1 - c0, 3), dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slides") / "tissue.tiff", tissue_image(), levels=3, mpp=0.5)


def double_model(cls=SlideNet) -> SlideNet:
    model = cls(mean=MEAN, std=STD, double=True)
    model.model_info = ls.ModelInfo(classes=["a", "b", "c"], spacing=SPACING)
    return model


def tissue_box(slide: ls.Slide) -> tuple[slice, slice]:
    mask = TISSUE.detect(slide)
    layout = ls.Layout.from_mask(mask, SPACING, slide.size(SPACING))
    (r0, r1), (c0, c1) = layout.rows[0], layout.cols[0]
    return slice(r0, r1), slice(c0, c1)


def reference(model, slide: ls.Slide, kind: str) -> tuple[torch.Tensor, np.ndarray]:
    """Conventional float64: the probabilities, and the heatmap pooled onto the slide grid."""
    rows, cols = tissue_box(slide)
    pixels = model.tile_transform(slide.read(SPACING, (rows, cols))[None]).requires_grad_()
    features = model.trunk(pixels)
    features.retain_grad()
    logits = model.head(features)
    score = logits[0, logits[0].argmax()]
    score.backward()
    grid = HeatmapGrid.covering(slide.size(SPACING), SPACING, HEATMAP_SPACING, (1.0, 1.0))
    heat_rows = grid.index(np.arange(rows.start, rows.stop), 0)
    heat_cols = grid.index(np.arange(cols.start, cols.stop), 1)
    if kind == "saliency":
        values = pixels.grad.abs().amax(dim=1)[0].numpy()
    else:
        coarse = grad_cam(features.detach(), features.grad) if kind == "cam" else (
            model.head[0].location_weights(features.detach())
        )
        h, w = coarse.shape[-2:]
        cell_rows = np.floor((np.arange(rows.stop - rows.start) + 0.5) * h / (rows.stop - rows.start)).astype(int)
        cell_cols = np.floor((np.arange(cols.stop - cols.start) + 0.5) * w / (cols.stop - cols.start)).astype(int)
        values = coarse[0].detach().numpy()[np.ix_(cell_rows, cell_cols)]
    return logits.detach().softmax(dim=1)[0], reference_pool(values, heat_rows, heat_cols, grid.shape, "mean")


def predict(model, path, **options) -> ls.SlidePrediction:
    options = {"tile_size": 36, "saliency_tile_size": 30, "heatmap_spacing": HEATMAP_SPACING, "tissue": TISSUE,
               **options}  # fmt: skip
    return ls.predict_slide(model, path, **options)


@pytest.mark.parametrize("cls, kinds", [(SlideNet, ("saliency", "cam")), (AttentionNet, ("attention",))])
def test_whole_slide_prediction_and_heatmaps_equal_the_conventional_ones(slide_path, cls, kinds):
    model = double_model(cls)
    fractions = []
    prediction = predict(model, slide_path, heatmaps=kinds, progress=fractions.append)
    slide = ls.Slide(slide_path)
    rows, cols = tissue_box(slide)
    assert prediction.region == ((rows.start, rows.stop), (cols.start, cols.stop))
    assert prediction.region != ((0, slide.size(SPACING)[0]), (0, slide.size(SPACING)[1]))  # tissue only
    assert len(ls.tile_plan(model.trunk, (1, 3, rows.stop - rows.start, cols.stop - cols.start), 30)) >= 6
    for kind in kinds:
        probabilities, heatmap = reference(model, slide, kind)
        assert prediction.probabilities == pytest.approx(dict(zip("abc", probabilities.tolist())), rel=1e-12)
        assert prediction.label == "abc"[int(probabilities.argmax())]
        found = prediction.heatmaps[kind]
        assert found.values.dtype == np.float32 and found.values.shape == heatmap.shape
        np.testing.assert_allclose(found.values, heatmap, rtol=1e-5, atol=1e-7 * heatmap.max())  # float32 storage
        assert heatmap.max() > 0 and found.spacing == HEATMAP_SPACING
        assert found.to_level0 == pytest.approx((HEATMAP_SPACING / 0.5,) * 2)
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert prediction.thumbnail.shape[:2] == slide.size(HEATMAP_SPACING)


def test_the_slide_is_read_tile_by_tile_at_the_prediction_spacing(slide_path, monkeypatch):
    reads = []
    original = ls.Slide.read

    def recording(self, spacing, region=None):
        if spacing == SPACING:
            rows, cols = region if region is not None else (None, None)
            reads.append(None if region is None else (rows.stop - rows.start) * (cols.stop - cols.start))
        return original(self, spacing, region)

    monkeypatch.setattr(ls.Slide, "read", recording)
    predict(double_model(), slide_path, heatmaps=("saliency",))
    rows, cols = tissue_box(ls.Slide(slide_path))
    assert reads and None not in reads
    assert max(reads) < 0.5 * (rows.stop - rows.start) * (cols.stop - cols.start)


def test_default_tile_sizes_fit_the_memory_budget(slide_path):
    model = double_model()
    small = predict(model, slide_path, heatmaps=("saliency",), tile_size=None, saliency_tile_size=None,
                    memory_budget="1MiB")  # fmt: skip
    whole = predict(model, slide_path, heatmaps=("saliency",), tile_size=None, saliency_tile_size=None)
    assert small.probabilities == pytest.approx(whole.probabilities, rel=1e-12)
    np.testing.assert_allclose(small.heatmaps["saliency"].values, whole.heatmaps["saliency"].values, rtol=1e-5)


def test_without_a_tile_size_the_planner_chooses_the_forward_within_the_budget(slide_path):
    """The forward follows the core's plan for the budget (here: several tiles, the trunk's
    last children run whole on the streamed part's output), and stays exact."""
    model = double_model()
    slide = ls.Slide(slide_path)
    rows, cols = tissue_box(slide)
    shape = (1, 3, rows.stop - rows.start, cols.stop - cols.start)
    budget = 100_000  # bytes: far less than the whole box's forward, enough for a few tiles
    plan = ls.stream_plan(model.trunk, shape, memory_budget=budget, grad=False, input_dtype=torch.uint8)
    assert len(plan.tiles) > 1 and plan.split is not None
    fractions = []
    prediction = predict(model, slide_path, heatmaps=("cam",), tile_size=None, saliency_tile_size=None,
                         memory_budget=budget, progress=fractions.append)  # fmt: skip
    probabilities, heatmap = reference(model, slide, "cam")
    assert prediction.probabilities == pytest.approx(dict(zip("abc", probabilities.tolist())), rel=1e-12)
    np.testing.assert_allclose(prediction.heatmaps["cam"].values, heatmap, rtol=1e-5, atol=1e-7 * heatmap.max())
    assert len(fractions) >= len(plan.tiles) and fractions[-1] == 1.0


def test_a_plain_image_takes_the_model_spacing_and_outputs_are_written(tmp_path, slide_path):
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(tissue_image(120, 90)).save(png)
    model = SlideNet(mean=MEAN, std=STD)
    with pytest.raises(ls.MissingSpacingError, match="pass base_spacing="):
        ls.predict_slide(model, png, spacing=None)
    model.model_info = ls.ModelInfo(classes=["a", "b", "c"], spacing=2.0)
    prediction = ls.predict_slide(model, png, heatmaps=("saliency", "cam"), tissue=None)
    assert prediction.size == (120, 90) and prediction.spacing == 2.0
    paths = ls.write_prediction(prediction, tmp_path / "out")
    assert {"csv", "json", "saliency.npy", "saliency.png", "saliency.geojson", "cam.npy", "cam.png"} <= set(paths)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "slide,label,p_a,p_b,p_c,spacing_um" and rows[1].startswith(f"{png},{prediction.label},")
    np.testing.assert_array_equal(np.load(paths["cam.npy"]), prediction.heatmaps["cam"].values)
    summary = json.loads(paths["json"].read_text())[0]
    assert summary["label"] == prediction.label and summary["heatmaps"]["saliency"]["spacing_um"] > 0
    features = json.loads(paths["saliency.geojson"].read_text())
    assert features["type"] == "FeatureCollection" and features["features"]
    picture = Image.open(paths["saliency.png"])
    assert picture.size[0] > 640 and picture.mode == "RGB"
    image = ls.render_overlay(prediction, "cam", opacity=0.8)
    assert image.size == picture.size


# ------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, slide_path):
    """A SlideNet fitted one step through SlideDataModule, saved by the Trainer."""
    folder = tmp_path_factory.mktemp("trained")
    manifest = folder / "train.csv"
    manifest.write_text(f"slide,label\n{slide_path},tumour\n{slide_path},normal\n")
    data = ls.SlideDataModule(train=manifest, spacing=SPACING, input_size=64, batch_size=2, tissue=None)
    model = SlideNet(num_classes=2)
    model.tile_transform = ls.Uint8Normalize(MEAN, STD)  # set after construction: the checkpoint must carry it
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=48), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def test_a_checkpoint_records_what_inference_needs_as_plain_data(trained):
    model, path = trained
    record = torch.load(path, weights_only=True)["lightning_streaming"]
    assert record["classes"] == ["normal", "tumour"] and record["spacing"] == SPACING
    assert record["task"] == "classification" and record["mean"] == MEAN and record["model_class"].endswith(":SlideNet")
    loaded = ls.load_model(path, SlideNet)
    info = ls.model_info(loaded)
    assert (info.classes, info.spacing, info.checkpoint) == (["normal", "tumour"], SPACING, str(path))
    assert not loaded.training and isinstance(loaded.tile_transform, ls.Uint8Normalize)
    x = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert ls.load_model(path, "inference_models:SlideNet").model_info.classes == ["normal", "tumour"]


def test_checkpoint_errors_name_the_problem(trained, tmp_path):
    _, path = trained
    with pytest.raises(ls.CheckpointError, match=r"was saved from inference_models:SlideNet, not .*OtherNet"):
        ls.load_model(path, OtherNet)
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ls.CheckpointError, match="is not a readable PyTorch checkpoint"):
        ls.load_model(not_a_checkpoint, SlideNet)
    with pytest.raises(ls.CheckpointError, match="does not exist"):
        ls.load_model(tmp_path / "missing.ckpt", SlideNet)
    torch.save(OtherNet().state_dict(), tmp_path / "other.pt")
    with pytest.raises(ls.CheckpointError, match="does not fit SlideNet"):
        ls.load_model(tmp_path / "other.pt", SlideNet)
    with pytest.raises(ModuleNotFoundError, match="cannot import 'no_such_module'"):
        ls.load_model(path, "no_such_module:Model")


def test_slides_that_cannot_be_read_and_spacings_they_do_not_have(example_slides, slide_path, tmp_path):
    model = double_model()
    with pytest.raises(ls.SlideOpenError):
        ls.predict_slide(model, example_slides.unopenable_tiff, heatmaps=())
    with pytest.raises(ls.SlideNotFoundError, match="does not exist"):
        ls.predict_slide(model, tmp_path / "missing.svs", heatmaps=())
    with pytest.raises(ls.SpacingError, match=r"finer than .* level 0 \(0.5 um/px\).*trained at 1.5 um/px"):
        ls.predict_slide(model, slide_path, 0.25, heatmaps=())
    with pytest.raises(ValueError, match="'attention' needs a head with a location_weights"):
        ls.predict_slide(model, slide_path, heatmaps=("attention",))
    blocker = tmp_path / "file"
    blocker.write_text("")
    prediction = predict(model, slide_path, heatmaps=())
    with pytest.raises(ls.OutputError, match="cannot write predictions to .*Choose another output folder"):
        ls.write_prediction(prediction, blocker / "out")


# ----------------------------------------------------------------------- command line


def run_command(*arguments: str, cwd: Path = TESTS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_streaming", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_predict_command(trained, slide_path, tmp_path):
    _, path = trained
    out = tmp_path / "out"
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,label\n{slide_path},normal\n")
    result = run_command("predict", "--checkpoint", str(path), "--model", "inference_models:SlideNet",
                         "--manifest", str(manifest), "--output", str(out), "--heatmaps", "cam", "--no-progress",
                         "--tile-size", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "slide,label,p_normal,p_tumour,target,spacing_um" and rows[1].endswith(",normal,1.5")
    assert (out / "tissue.cam.png").is_file() and (out / "tissue.cam.geojson").is_file()
    assert "classes ['normal', 'tumour']" in result.stdout


def test_the_predict_command_names_what_is_wrong(trained, slide_path, tmp_path, capsys, monkeypatch):
    from lightning_streaming.cli import main

    _, path = trained
    monkeypatch.chdir(TESTS)
    common = ["--checkpoint", str(path), "--output", str(tmp_path / "out"), "--no-progress", "--heatmaps"]
    assert main(["predict", "--model", "inference_models:OtherNet", str(slide_path), *common]) == 2
    error = capsys.readouterr().err
    assert "error: checkpoint" in error and "was saved from inference_models:SlideNet, not" in error
    blocked = ["--checkpoint", str(path), "--output", str(path / "out"), "--no-progress"]
    assert main(["predict", "--model", "inference_models:SlideNet", str(slide_path), *blocked]) == 2
    assert "cannot write predictions to" in capsys.readouterr().err
    assert main(["predict", "--model", "inference_models:SlideNet", str(path), *common]) == 1  # not a slide
    error = capsys.readouterr().err
    assert "model.ckpt" in error and "1 of 1 slide(s) failed" in error
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and "predict" in capsys.readouterr().out
