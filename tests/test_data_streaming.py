"""Slides streamed lazily: exact against the materialised image, read tile by tile, and a
streamed training step on the real slide through the DataModule and the strategy."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_streaming as ls


class Recording(ls.RegionSource):
    """Wraps a source and records the boxes read."""

    def __init__(self, source):
        self.source, self.boxes = source, []

    @property
    def shape(self):
        return self.source.shape

    def read(self, region):
        self.boxes.append(tuple((s.start, s.stop) for s in region))
        return self.source.read(region)


def trunk64() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
    ).double()  # fmt: skip


def test_a_real_slide_streams_exactly_without_being_materialised(example_slides, one_thread):
    slide = ls.Slide(example_slides.cmu_small_region)
    mask = ls.detect_tissue(slide, 16.0)
    layout = ls.Layout.from_mask(mask, 4.0, slide.size(4.0), remove_empty=True)
    source = Recording(ls.SlideRegionSource(slide, 4.0, layout))
    normalise = ls.Uint8Normalize([0.74, 0.67, 0.73], [0.19, 0.26, 0.19], dtype=torch.float64)
    torch.manual_seed(0)
    trunk = trunk64()
    out = ls.stream(trunk, source, 96, transform=normalise, keep_graphs=0)
    out.square().mean().backward()
    streamed = [p.grad.clone() for p in trunk.parameters()]
    height, width = source.shape[2:]
    assert all((b - a) <= 96 for box in source.boxes for a, b in box)  # tile-sized reads only
    assert len(source.boxes) == 2 * len(ls.tile_plan(trunk, source.shape, 96)) > 2  # forward + recompute
    trunk.zero_grad()
    image = ls.read_all(source.source)
    assert image.shape == (1, 3, height, width) and image.dtype == torch.uint8
    expected = trunk(normalise(image))
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, p in zip(streamed, trunk.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


class SlideClassifier(ls.StreamingMixin, pl.LightningModule):
    def __init__(self, mean, std):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        self.tile_transform = ls.Uint8Normalize(mean, std)
        self.seen, self.losses = [], []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((type(images).__name__, tuple(images.shape), images.dtype, str(images.device)))
        loss = nn.functional.cross_entropy(self(images), labels)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "uint8"])
def test_streamed_training_on_the_real_slide_through_the_datamodule(example_slides, tmp_path, lazy, one_thread):
    manifest = tmp_path / "train.csv"
    manifest.write_text(f"slide,label\n{example_slides.cmu_small_region},1\n{example_slides.cmu_small_region},0\n")
    data = ls.SlideDataModule(train=manifest, spacing=2.0, input_size=(384, 320), batch_size=2, lazy=lazy,
                              tissue=ls.TissueDetection(spacing=16.0), cache_dir=tmp_path / "masks")  # fmt: skip
    model = SlideClassifier([0.74, 0.67, 0.73], [0.19, 0.26, 0.19])
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=128, input_on_host=True), max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    kind = "StackedSource" if lazy else "Tensor"
    assert model.seen == [(kind, (2, 3, 384, 320), torch.uint8, "cpu")] * 2
    assert len(model.losses) == 2 and all(torch.isfinite(torch.tensor(model.losses)))
    assert len(list((tmp_path / "masks").glob("*.tissue.npz"))) == 1  # one slide, one cached mask
