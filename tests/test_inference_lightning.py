"""Prediction through Lightning (the mixin's default predict_step, SlideDataModule predict
sets with and without labels, plain tensors, PredictionWriter) and the mixin outside a Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import write_pyramid
from inference_models import SlideNet
from test_inference_predict import MEAN, STD, tissue_image
from test_lightning_helpers import TinyClassifier, trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

import lightning_streaming as ls

SPACING = 1.0


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    return [write_pyramid(folder / f"slide{i}.tiff", tissue_image(120 + 8 * i, 100, seed=i), levels=2, mpp=0.5)
            for i in range(3)]  # fmt: skip


def model() -> SlideNet:
    net = SlideNet(mean=MEAN, std=STD, num_classes=2)
    net.model_info = ls.ModelInfo(classes=["normal", "tumour"], spacing=SPACING)
    return net.eval()


def predict(net, data, callbacks=()):
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=32), callbacks=list(callbacks),
                         **trainer_kwargs())  # fmt: skip
    return trainer.predict(net, datamodule=data) if isinstance(data, pl.LightningDataModule) else trainer.predict(
        net, data
    )


def conventional(net, path) -> torch.Tensor:
    with torch.no_grad(), net.streaming(enabled=False):
        return net(ls.Slide(path).read(SPACING)[None]).softmax(dim=1)[0]


@pytest.mark.parametrize("labelled", [False, True])
def test_a_slide_datamodule_predict_set_with_or_without_labels(tmp_path, slides, labelled):
    manifest = tmp_path / "predict.csv"
    labels = ["tumour", "normal", "tumour"]
    rows = [f"{path},{label}" if labelled else str(path) for path, label in zip(slides, labels)]
    manifest.write_text(("slide,label\n" if labelled else "slide\n") + "\n".join(rows) + "\n")
    data = ls.SlideDataModule(predict=manifest, spacing=SPACING, tissue=None)
    net = model()
    outputs = predict(net, data)
    assert [s for batch in outputs for s in batch["slides"]] == [str(p) for p in slides]
    for batch, path in zip(outputs, slides):
        torch.testing.assert_close(batch["probabilities"][0], conventional(net, path), rtol=1e-5, atol=1e-6)
    if labelled:  # indices follow the model's classes, not the manifest's sorted names
        assert [int(b["targets"][0]) for b in outputs] == [["normal", "tumour"].index(name) for name in labels]
    else:
        assert all("targets" not in b for b in outputs)


class DefaultPredict(TinyClassifier):
    predict_step = ls.StreamingMixin.predict_step  # TinyClassifier has its own


def test_plain_tensors_are_predicted_with_their_indices():
    torch.manual_seed(0)
    net = DefaultPredict().eval()
    x = torch.randn(5, 3, 40, 36)
    outputs = predict(net, DataLoader(TensorDataset(x), batch_size=2))
    assert [s for b in outputs for s in b["slides"]] == ["0", "1", "2", "3", "4"]
    torch.testing.assert_close(torch.cat([b["probabilities"] for b in outputs]), net(x).softmax(dim=1))


def test_the_prediction_writer_writes_what_predict_slide_makes(tmp_path, slides):
    manifest = tmp_path / "predict.csv"
    manifest.write_text("slide\n" + "\n".join(map(str, slides[:2])) + "\n")
    data = ls.SlideDataModule(predict=manifest, spacing=SPACING, tissue=None, lazy=True)
    writer = ls.PredictionWriter(tmp_path / "out", heatmaps=("saliency", "cam"), heatmap_spacing=2.0, tile_size=40,
                                 saliency_tile_size=30)  # fmt: skip
    net = model()
    predict(net, data, callbacks=[writer])
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "slide,label,p_normal,p_tumour,spacing_um" and len(lines) == 3
    for path in slides[:2]:
        alone = ls.predict_slide(net, path, heatmaps=("saliency", "cam"), heatmap_spacing=2.0, tile_size=40,
                                 saliency_tile_size=30, tissue=None)  # fmt: skip
        assert f"{path},{alone.label}," in "\n".join(lines)
        for kind in ("saliency", "cam"):
            written = np.load(tmp_path / "out" / f"{path.stem}.{kind}.npy")
            np.testing.assert_allclose(written, alone.heatmaps[kind].values, rtol=1e-5, atol=1e-9)
            assert (tmp_path / "out" / f"{path.stem}.{kind}.png").is_file()


def test_the_prediction_writer_refuses_a_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ls.OutputError, match="cannot write predictions to"):
        ls.PredictionWriter(blocker / "out")
    with pytest.raises(ValueError, match=r"unknown heatmap kind\(s\) \['gradcam'\]"):
        ls.PredictionWriter(tmp_path, heatmaps=("gradcam",))


# -------------------------------------------------------- the mixin outside a Trainer


def test_model_of_x_streams_an_input_larger_than_a_tile(monkeypatch):
    from lightning_streaming.lightning import mixin

    calls = []
    monkeypatch.setattr(mixin, "stream", lambda *a, **k: calls.append(a[2]) or ls.stream(*a, **k))
    net = TinyClassifier().double()
    net.default_tile_size = 32
    small, large = torch.randn(1, 3, 30, 32, dtype=torch.float64), torch.randn(2, 3, 70, 45, dtype=torch.float64)
    net(small)
    assert calls == []  # within one tile: conventional, the same computation
    streamed = net(large)
    assert calls == [32]
    streamed.sum().backward()  # gradients flow through the streamed trunk
    with net.streaming(enabled=False):
        conventional = net(large)
    assert calls == [32]
    torch.testing.assert_close(streamed, conventional, rtol=1e-12, atol=1e-12)
    with net.streaming(tile_size=24):
        torch.testing.assert_close(net(small), net.head(net.trunk(small)), rtol=1e-12, atol=1e-12)
    assert calls == [32, 24]
    source = ls.TensorSource(small)
    torch.testing.assert_close(net(source), net.head(net.trunk(small)), rtol=1e-12, atol=1e-12)
    assert calls == [32, 24, 32]  # a lazy input is never read whole


def test_after_a_conventional_fit_a_large_input_is_streamed(monkeypatch):
    from lightning_streaming.lightning import mixin
    from test_lightning_helpers import RankData

    net = TinyClassifier()
    net.default_tile_size = 32
    calls = []
    monkeypatch.setattr(mixin, "stream", lambda *a, **k: calls.append(a[2]) or ls.stream(*a, **k))
    pl.Trainer(max_steps=1, **trainer_kwargs()).fit(net, RankData([(48, 40)], 2))  # any other strategy
    assert calls == []  # while that Trainer runs, the trunk runs as it chose: conventionally
    net.eval()(torch.randn(1, 3, 80, 64))
    assert calls == [32]
