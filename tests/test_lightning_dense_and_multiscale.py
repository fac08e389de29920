"""StreamingMixin with a trunk that returns several feature maps (FPN levels) or a full
resolution map (U-Net segmentation): trained streamed, it gives the conventional weights."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_lightning_helpers import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import families as fam
import lightning_streaming as ls


class MultiScaleClassifier(ls.StreamingMixin, pl.LightningModule):
    """FPN trunk (a dict of levels), a head that pools every level: the structure reaches the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = fam.FPN(width=4, out=4)
        self.head = nn.Linear(16, 3)
        self.structures: list[tuple] = []

    def forward_head(self, levels):
        return self.head(torch.cat([level.amax((2, 3)) for level in levels.values()], 1))

    def forward(self, x):
        levels = self.forward_trunk(x)
        self.structures.append(tuple(levels))
        return self.forward_head(levels)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Segmenter(ls.StreamingMixin, pl.LightningModule):
    """A U-Net as the whole trunk (its output at the input's resolution), no head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = fam.UNet(inp=3, classes=2, width=4, depth=2)
        self.head = nn.Identity()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(model: pl.LightningModule, strategy, data: TensorDataset) -> pl.LightningModule:
    trainer = pl.Trainer(strategy=strategy, max_epochs=1, precision="64-true", **trainer_kwargs())
    trainer.fit(model, DataLoader(data, batch_size=2))
    return model


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_multi_output_trunk_passes_its_structure_to_the_head_and_trains_exactly():
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(4, 3, 256, 320, generator=generator), torch.tensor([0, 1, 2, 1]))
    streamed = fit(MultiScaleClassifier(), ls.StreamingStrategy(tile_size=(256, 224)), data)
    conventional = fit(MultiScaleClassifier(), "auto", data)
    assert len(ls.tile_plan(streamed.trunk, (2, 3, 256, 320), (256, 224))) > 1
    assert set(streamed.structures) == {("p2", "p3", "p4", "p5")}
    assert_same_weights(streamed, conventional)


def test_unet_segmentation_trains_streamed_at_full_resolution():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 72, 56, generator=generator)
    masks = (images[:, 0] > 0).long()
    streamed = fit(Segmenter(), ls.StreamingStrategy(tile_size=48), TensorDataset(images, masks))
    conventional = fit(Segmenter(), "auto", TensorDataset(images, masks))
    plan = ls.tile_plan(streamed.trunk, (2, 3, 72, 56), 48)
    assert len(plan) > 1 and plan.output_shape == (72, 56)
    assert_same_weights(streamed, conventional)
