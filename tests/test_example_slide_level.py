"""examples/slide_level: the Table III network and its split, and both task scripts run end
to end on the real example slide in their smallest smoke settings (one epoch), checking
what they claim: metrics computed, results written, the learning rate decayed by 0.99,
frozen BatchNorm untouched by training, LSUV rescaling the trunk, the trunk streamed in
several tiles."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_streaming as ls

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "slide_level"))

import camelyon_like  # noqa: E402
import tupac_like  # noqa: E402
from paper_net import extra_blocks_for, split_layers, table3_network  # noqa: E402
from slide_training import SlideLevelModel  # noqa: E402

# The smallest settings that still stream: 192 px inputs in 2 x 2 tiles of at most 160 px.
INPUT, TILE = 192, 160
TINY = ["--smoke", "--epochs", "1", "--spacing", "4", "--input-size", str(INPUT), "--tile", str(TILE),
        "--width", "0.0625", "--batch-size", "2", "--lsuv-batches", "1", "--no-progress"]  # fmt: skip
BATCH_NORM = nn.modules.batchnorm._BatchNorm


class Recorder(pl.Callback):
    """Records the weights when fit starts and when the first training batch starts (after
    LSUV), whether any BatchNorm was in training mode in a training step, and the input
    size and number of calls of the trunk's first convolution in each training step."""

    def __init__(self) -> None:
        self.at_start: dict[str, torch.Tensor] = {}
        self.at_first_batch: dict[str, torch.Tensor] = {}
        self.first_conv_inputs: list[tuple[int, ...]] = []
        self.calls_per_step: list[int] = []
        self.bn_training: list[bool] = []
        self._in_step = False

    @staticmethod
    def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = self._copy(pl_module)
        self._handle = pl_module.trunk.block1_conv1.conv.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._in_step:
            self.first_conv_inputs.append(tuple(args[0].shape[-2:]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.at_first_batch:
            self.at_first_batch = self._copy(pl_module)
        self.bn_training.append(any(m.training for m in pl_module.modules() if isinstance(m, BATCH_NORM)))
        self._calls_before, self._in_step = len(self.first_conv_inputs), True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        self.calls_per_step.append(len(self.first_conv_inputs) - self._calls_before)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.remove()


def check_common(result, recorder: Recorder, folder: Path, name: str) -> None:
    """Results written, the learning rate decayed once by 0.99, the trunk streamed in tiles."""
    assert (folder / f"{name}.md").is_file() and (folder / f"{name}.png").stat().st_size > 1000
    table = (folder / f"{name}.md").read_text()
    assert "| epoch |" in table and "| 0 |" in table and "Smoke mode" in table
    assert Path(result.best_checkpoint).is_file()
    assert list(folder.glob("logs/version_*/metrics.csv"))
    assert len(result.history) == 1
    assert result.history[0]["lr"] == pytest.approx(1e-4)  # the rate epoch 0 trained with
    assert result.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.99e-4)  # after one epoch
    assert math.isfinite(result.history[0]["train/loss"]) and math.isfinite(result.history[0]["val/loss"])
    # Streamed: the first convolution saw tile regions, never the whole 192 px image, several times a step.
    assert recorder.first_conv_inputs and all(max(s) <= TILE for s in recorder.first_conv_inputs)
    assert min(recorder.calls_per_step) >= 4  # 2 x 2 tiles in the forward, and their recomputation
    assert "4 tiles (2 x 2)" in result.tiles


def test_camelyon_like_smoke_auroc_lsuv_and_decay(tmp_path: Path, example_slides) -> None:
    recorder = Recorder()
    result = camelyon_like.main([*TINY, "--results", str(tmp_path)], callbacks=[recorder])
    check_common(result, recorder, tmp_path, "camelyon_like")
    entry = result.history[0]
    assert {"val/auroc_blank", "val/auroc_tissue", "val/auroc", "val/accuracy"} <= set(entry)
    for key in ("val/auroc_blank", "val/auroc_tissue", "val/auroc", "val/accuracy"):
        assert 0.0 <= entry[key] <= 1.0, (key, entry[key])
    # The paper's CAMELYON17 choices are the defaults: no BatchNorm, no dropout, weight decay 1e-6.
    model = result.model
    assert not any(isinstance(m, (BATCH_NORM, nn.Dropout)) for m in model.modules())
    assert result.trainer.optimizers[0].param_groups[0]["weight_decay"] == 1e-6
    # LSUV ran between fit start and the first step: each output channel of the first
    # convolution was scaled by 1 / (its std before), so the channels' weight-norm ratios
    # span [1 / max std, 1 / min std] of the report, and the outputs now have std 1.
    report = {row["layer"]: row for row in result.lsuv_report}
    assert len(report) == 10 and all(abs(row["std_after"] - 1) < 0.02 for row in report.values())
    key = "trunk.block1_conv1.conv.weight"
    ratio = recorder.at_first_batch[key].flatten(1).norm(dim=1) / recorder.at_start[key].flatten(1).norm(dim=1)
    first = report["block1_conv1.conv"]
    assert ratio.min().item() == pytest.approx(1 / first["std_before_max"], rel=0.02)
    assert ratio.max().item() == pytest.approx(1 / first["std_before_min"], rel=0.02)
    assert abs(ratio.max().item() / ratio.min().item() - 1) > 0.05  # a real, per-channel rescaling


def test_tupac_like_smoke_spearman_frozen_bn(tmp_path: Path, example_slides) -> None:
    recorder = Recorder()
    result = tupac_like.main([*TINY, "--freeze-bn", "--results", str(tmp_path)], callbacks=[recorder])
    check_common(result, recorder, tmp_path, "tupac_like")
    rho = result.history[0]["val/spearman"]
    assert math.isfinite(rho) and -1.0 <= rho <= 1.0
    assert result.lsuv_report == []
    # Without LSUV nothing touches the weights before the first step.
    assert all(torch.equal(recorder.at_start[k], recorder.at_first_batch[k]) for k in recorder.at_start)
    # Frozen BatchNorm: eval mode in every step, affine parameters and running statistics
    # (num_batches_tracked included) exactly as before training; the rest did train.
    end = result.model.state_dict()
    bn_keys = [k for k in end if ".bn." in k]
    assert len(bn_keys) == 4 * 5  # weight, bias, running_mean, running_var, num_batches_tracked
    assert not any(recorder.bn_training)
    assert all(torch.equal(recorder.at_start[k], end[k]) for k in bn_keys)
    assert not torch.equal(recorder.at_start["head.fc.linear.weight"], end["head.fc.linear.weight"])
    assert not torch.equal(recorder.at_start["head.block6_conv1.conv.weight"], end["head.block6_conv1.conv.weight"])
    # Dropout 0.5 before the fully connected layer, as for TUPAC16.
    assert result.model.head.fc.dropout.p == 0.5


def test_table3_layer_counts_and_split() -> None:
    # 22, 25 and 28 layers for 2048, 4096 and 8192 px in the paper's equal-field-of-view experiment.
    for size, layers in ((2048, 22), (4096, 25), (8192, 28)):
        network = table3_network(1, width=0.125, extra_blocks=extra_blocks_for(size))
        assert len(network) == layers
    assert extra_blocks_for(1024) == 0
    network = table3_network(4, width=0.125)
    trunk, head = split_layers(network)
    assert len(head) == 7 and list(head._modules)[-2:] == ["global_pool", "fc"]
    assert not any(isinstance(m, BATCH_NORM) for m in trunk.modules())
    assert sum(isinstance(m, BATCH_NORM) for m in head.modules()) == 4  # both convolutions of the last two blocks
    assert [m.out_channels for m in trunk.modules() if isinstance(m, nn.Conv2d)] == [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    # He initialisation: a convolution's weight std is sqrt(2 / fan_in).
    conv = network.block5_conv1.conv
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)


def test_batchnorm_in_the_trunk_needs_freezing_and_then_streams_exactly() -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="BatchNorm.*--freeze-bn"):
        SlideLevelModel("regression", 1, mean, std, width=0.0625, head_layers=4)
    model = SlideLevelModel("regression", 1, mean, std, width=0.0625, head_layers=4, freeze_bn=True)
    model.train()
    trunk_bns = [m for m in model.trunk.modules() if isinstance(m, BATCH_NORM)]
    assert len(trunk_bns) == 2 and not any(m.training for m in trunk_bns)
    assert not any(p.requires_grad for m in trunk_bns for p in m.parameters())
    with torch.no_grad():  # non-trivial frozen statistics, as from a trained checkpoint
        for bn in trunk_bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    shape, tile = (1, 3, 448, 320), 320  # the trunk's receptive field is over 300 px wide
    assert len(ls.tile_plan(model.trunk, shape, tile)) == 3
    ls.verify(model.trunk, shape, tile_size=tile)  # float64; raises if streamed != conventional
