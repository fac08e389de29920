"""StreamingMixin, split_at and the 'auto' tile size, mostly without a Trainer."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_lightning_helpers import RankData, TinyClassifier, tiny_trunk, trainer_kwargs
from torch import nn
from trunks import BasicBlock, ResNet

import lightning_streaming as ls
from lightning_streaming.lightning.auto_tile import parse_bytes



def attach(model: pl.LightningModule, strategy) -> pl.LightningModule:
    """Attach a Trainer with ``strategy`` without fitting (what a running Trainer does)."""
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs())
    trainer.strategy.connect(model)
    model.trainer = trainer
    return model


# --------------------------------------------------------------------------- split_at


def small_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], width=4, num_classes=3).double().eval()


def test_split_at_a_torchvision_style_resnet():
    network = small_resnet()
    trunk, head = ls.split_at(network, "layer2")
    assert [name for name, _ in trunk.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert "layer1.0.conv1.weight" in dict(trunk.named_parameters())
    assert set(dict(head.named_parameters())) == {n for n, _ in network.named_parameters() if n.split(".")[0] in {"layer3", "layer4", "fc"}}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(head(trunk(x)), network(x), rtol=0, atol=0)
    assert isinstance(network.conv1, nn.Conv2d)  # the original network is untouched
    assert trunk.layer1 is network.layer1 and head.fc is network.fc  # parameters are shared


def test_split_at_unknown_child_names_the_children():
    with pytest.raises(ValueError, match=r"no direct child 'layer9'; its children are \['conv1', 'bn1'"):
        ls.split_at(small_resnet(), "layer9")


class SplitResNet(ls.StreamingMixin, pl.LightningModule):
    """A ResNet split after layer1: frozen (eval) BatchNorm in the trunk, training BatchNorm in the head."""

    def __init__(self):
        super().__init__()
        network = small_resnet().train()
        self.trunk, self.head = ls.split_at(network, "layer1")
        self.trunk.eval()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_split_resnet_trains_streamed_like_conventional():
    def fit(strategy):
        model = SplitResNet()
        pl.Trainer(strategy=strategy, max_epochs=1, precision="64-true", **trainer_kwargs()).fit(
            model, RankData([(96, 80)], 2, batch_size=3)
        )
        return model

    streamed, conventional = fit(ls.StreamingStrategy(tile_size=48)), fit("auto")
    assert len(ls.tile_plan(streamed.trunk, (3, 3, 96, 80), 48)) > 1
    for (name, a), (_, b) in zip(streamed.named_parameters(), conventional.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------ mixin


def test_forward_is_conventional_without_a_streaming_strategy_and_equal_with_one(monkeypatch):
    model = TinyClassifier().double()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    assert model.streaming_settings is None
    conventional = model(x)
    conventional.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    attach(model, ls.StreamingStrategy(tile_size=24))
    assert model.streaming_settings is not None
    calls = []
    monkeypatch.setattr(ls.lightning.settings, "stream", lambda *a, **k: calls.append(a) or ls.stream(*a, **k))
    streamed = model(x)
    streamed.sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(streamed, conventional, rtol=1e-12, atol=1e-12)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)

    attach(model, "auto")  # any other strategy: conventional again
    assert model.streaming_settings is None


class Uint8Classifier(TinyClassifier):
    """uint8 images, normalised per tile: the full float image never exists when streaming."""

    def tile_transform(self, tile: torch.Tensor) -> torch.Tensor:
        return (tile.to(torch.float64) - 128.0) / 64.0


def test_tile_transform_streamed_equals_conventional():
    model = Uint8Classifier().double()
    x = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    conventional = model(x)
    streamed = attach(model, ls.StreamingStrategy(tile_size=24))(x)
    torch.testing.assert_close(streamed, conventional, rtol=1e-12, atol=1e-12)


def test_streaming_split_override():
    class Custom(TinyClassifier):
        def streaming_split(self):
            return self.features, self.classifier

        def __init__(self):
            super().__init__()
            self.features, self.classifier = self.trunk, self.head
            del self.trunk, self.head

    model = Custom().double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    torch.testing.assert_close(attach(model, ls.StreamingStrategy(tile_size=20))(x), Custom().double()(x))


# -------------------------------------------------------------------------- auto tile


def test_parse_bytes():
    assert parse_bytes(1000) == 1000 and parse_bytes("2KiB") == 2048 and parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("2 parsecs")


def test_estimate_covers_what_autograd_saves_and_grows_with_the_tile():
    trunk = tiny_trunk()
    estimates = [ls.estimate_tile_memory(trunk, (2, 3, s, s)) for s in (16, 32, 64)]
    assert estimates[0] < estimates[1] < estimates[2]
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trunk(torch.randn(2, 3, 64, 64, requires_grad=True))
    assert sum(saved) <= estimates[2] <= 4 * sum(saved)
    # Under bf16 autocast activations are counted at 2 bytes.
    assert ls.estimate_tile_memory(trunk, (2, 3, 64, 64), activation_dtype=torch.bfloat16) < estimates[2]


def test_auto_tile_size_is_the_largest_that_fits():
    trunk, shape = tiny_trunk(), (2, 3, 300, 200)
    budget = 3 * 2**20
    tile = ls.auto_tile_size(trunk, shape, budget)
    assert ls.estimate_tile_memory(trunk, (2, 3, tile, min(tile, 200))) <= budget
    assert ls.estimate_tile_memory(trunk, (2, 3, tile + 1, min(tile + 1, 200))) > budget
    assert ls.auto_tile_size(trunk, shape, "1GiB") == 300  # everything fits: one tile
    with pytest.raises(ls.TileTooSmallError, match="memory_budget .* is too small"):
        ls.auto_tile_size(trunk, shape, 10_000)


def test_a_module_assigned_as_tile_transform_is_used():
    """nn.Module attributes live in _modules, where the mixin's class attribute would hide them."""

    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0

    model = TinyClassifier()
    x = torch.randn(2, 3, 16, 16)
    expected = model.head(model.trunk(x * 2.0))
    model.tile_transform = Scale()
    torch.testing.assert_close(model(x), expected)


def test_streaming_settings_accept_a_region_source():
    trunk = tiny_trunk()

    class Source(ls.RegionSource):
        shape = (1, 3, 40, 30)

        def read(self, region):
            return torch.ones(1, 3, *(s.stop - s.start for s in region), dtype=torch.uint8)

    out = ls.StreamingSettings(24).stream(trunk, Source(), torch.device("cpu"), transform=lambda t: t.float())
    torch.testing.assert_close(out, trunk(torch.ones(1, 3, 40, 30)))


def test_a_region_source_runs_conventionally_without_a_streaming_strategy():
    """Lazy DataModule batches are RegionSources: without a streaming strategy the mixin reads
    them whole (what a conventional run does) and gives the streamed numbers."""
    model = Uint8Classifier().double()
    pixels = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)

    class Source(ls.RegionSource):
        shape = tuple(pixels.shape)

        def read(self, region):
            return pixels[(slice(None), slice(None), *region)]

    conventional = model(Source())
    torch.testing.assert_close(conventional, model(pixels), rtol=0, atol=0)
    streamed = attach(model, ls.StreamingStrategy(tile_size=24))(Source())
    torch.testing.assert_close(streamed, conventional, rtol=1e-12, atol=1e-12)


def test_uint8_images_without_tile_transform_name_the_fix():
    """The core's message speaks of stream(transform=); a Lightning user sets tile_transform."""
    model = TinyClassifier()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for strategy in (None, ls.StreamingStrategy(tile_size=24)):
        if strategy is not None:
            attach(model, strategy)
        with pytest.raises(TypeError, match=r"TinyClassifier got images of dtype torch.uint8.*no tile_transform. "
                           r"Set self.tile_transform = lightning_streaming.Uint8Normalize\(mean, std\)"):  # fmt: skip
            model(pixels)
