"""StreamingLSUV: streamed statistics equal un-tiled ones, every chosen layer reaches the
target std, a deep BatchNorm-free trunk trains after it, DDP equals one process on the
union of the ranks' batches, and a resumed run skips it.

Models and data live at module level so that the spawned DDP workers can import them
(the tests directory is on sys.path, which spawn passes on).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

import lightning_streaming as ls
from lightning_streaming.lightning.channel_moments_metric import ChannelMomentsMetric
from test_lightning_helpers import join_as_torchrun_rank, leave_process_group


def small_trunk(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(8, 5, 1, bias=bias),
    )  # fmt: skip


def deep_trunk(depth: int = 16, width: int = 16) -> nn.Sequential:
    """A stride-2 stem and ``depth - 1`` 3x3 convolutions, ReLU between, no BatchNorm and no
    bias, PyTorch's default init: each layer shrinks the activations' std by about sqrt(6)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    return nn.Sequential(*layers)


class Net(ls.StreamingMixin, pl.LightningModule):
    """Trunk, then global average pooling and a linear layer; records the trunk's state and
    the random state when training starts (after the callbacks' on_train_start)."""

    def __init__(self, trunk: nn.Module, lr: float = 0.0, momentum: float = 0.0, record_dir: str | None = None):
        super().__init__()
        self.trunk = trunk
        channels = [m for m in trunk.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1].out_channels
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))
        self.lr, self.momentum, self.record_dir = lr, momentum, record_dir
        self.losses: list[float] = []
        self.start_state: dict[str, torch.Tensor] = {}
        self.start_rng: torch.Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def on_train_start(self) -> None:
        self.start_state = {k: v.detach().clone() for k, v in self.trunk.state_dict().items()}
        self.start_rng = torch.random.get_rng_state()
        if self.record_dir:
            lsuv = next(c for c in self.trainer.callbacks if isinstance(c, ls.StreamingLSUV))
            record = {"state": self.start_state, "report": lsuv.report}
            torch.save(record, os.path.join(self.record_dir, f"rank{self.global_rank}.pt"))


def batches(
    count: int, shape: tuple[int, ...], seed: int = 0, batch_size: int = 2, dtype=torch.float32, shift: float = 0.5
) -> list:
    """``count`` (image, label) batches: noise, plus ``shift`` in the channel named by the label."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, 2, (batch_size,), generator=generator)
        x = torch.randn(batch_size, 3, *shape, generator=generator, dtype=dtype)
        x[torch.arange(batch_size), y] += shift
        out.append((x, y))
    return out


def quiet(**overrides: Any) -> dict:
    kwargs = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


class Capture(logging.Handler):
    """Keeps the records that reach the logger it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def untiled_moments(trunk: nn.Module, inputs: list[torch.Tensor], layer: str) -> ls.ChannelMoments:
    """Reference: the moments of the layer's whole activation, from an ordinary forward."""
    total = None
    for x in inputs:
        captured = []
        handle = trunk.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
        with torch.no_grad():
            trunk(x)
        handle.remove()
        moments = ls.ChannelMoments.of(captured[0])
        total = moments if total is None else total + moments
    return total


def convs(trunk: nn.Module) -> list[str]:
    return [name for name, m in trunk.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


# ---------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("tile", [20, 33, 1000])
def test_streamed_statistics_equal_untiled_statistics(tile):
    torch.manual_seed(0)
    model = Net(small_trunk()).double()
    inputs = [torch.randn(2, 3, 61, 45, dtype=torch.float64), torch.randn(1, 3, 38, 70, dtype=torch.float64)]
    lsuv = ls.StreamingLSUV()
    streaming = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=tile), **quiet())
    conventional = pl.Trainer(**quiet())
    if tile == 33:  # the images really are cut into several tiles
        assert all(len(ls.tile_plan(model.trunk, x.shape, tile)) > 1 for x in inputs)
    measured = 0
    for layer in convs(model.trunk):
        expected = untiled_moments(model.trunk, inputs, layer)
        model.trainer = conventional
        assert model.streaming_settings is None
        plain = lsuv.layer_moments(conventional, model, layer, inputs)
        model.trainer = streaming
        assert model.streaming_settings is not None
        try:
            streamed = lsuv.layer_moments(streaming, model, layer, inputs)
        except ls.TileTooSmallError:
            assert tile == 20  # the deeper layers need more than 20 pixels
            continue
        measured += 1
        for moments in (streamed, plain):
            assert moments.count.item() == expected.count.item()
            torch.testing.assert_close(moments.sum, expected.sum, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(moments.sum_sq, expected.sum_sq, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(moments.std, expected.std, rtol=1e-10, atol=1e-12)
    assert measured >= 2


def test_channel_moments_metric_sums_and_reports_failures():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    metric = ChannelMomentsMetric(4)
    metric.update(ls.ChannelMoments.of(x[:1]))
    metric.update(ls.ChannelMoments.of(x[1:]))
    total = metric.compute()
    torch.testing.assert_close(total.std, x.transpose(0, 1).reshape(4, -1).std(1, correction=0))
    with pytest.raises(ValueError, match="moments of 3 channels cannot be added to a metric of 4"):
        metric.update(ls.ChannelMoments.of(x[:, :3]))
    metric.reset()
    metric.update(ls.ChannelMoments.of(x))
    metric.add_failure()
    with pytest.raises(RuntimeError, match="1 process\\(es\\) could not compute their part"):
        metric.compute()


# ---------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize(
    "streamed, center, target",
    [(True, False, 1.0), (True, True, 0.5), (False, True, 2.0)],
    ids=["streamed", "streamed-centred", "conventional-centred"],
)
def test_every_layer_reaches_the_target_std(tmp_path, caplog, streamed, center, target):
    torch.manual_seed(0)
    model = Net(small_trunk())
    data = batches(4, (52, 40), seed=3)
    lsuv = ls.StreamingLSUV(num_batches=3, target_std=target, center=center)
    strategy = ls.StreamingStrategy(tile_size=28) if streamed else "auto"
    trainer = pl.Trainer(
        strategy=strategy, max_steps=1, callbacks=[lsuv], **quiet(logger=CSVLogger(tmp_path, name="", version=""))
    )
    shown = Capture()  # where Lightning shows its model summary: its own console logger (INFO, as Lightning sets it)
    console = logging.getLogger("pytorch_lightning")
    level = console.level  # other tests' examples quieten it
    console.addHandler(shown)
    console.setLevel(logging.INFO)
    try:
        trainer.fit(model, DataLoader(data, batch_size=None))
    finally:
        console.removeHandler(shown)
        console.setLevel(level)

    # The weights when training started, on the calibration batches (the first 3), measured conventionally.
    trunk = small_trunk()
    trunk.load_state_dict(model.start_state)
    for layer in convs(trunk):
        moments = untiled_moments(trunk, [x for x, _ in data[:3]], layer)
        assert ((moments.std / target - 1).abs() <= 0.01).all(), (layer, moments.std)
        if center:
            assert (moments.mean.abs() <= 0.01 * target).all(), (layer, moments.mean)

    assert [row["layer"] for row in lsuv.report] == convs(trunk)
    for row in lsuv.report:
        assert row["iterations"] == 1 and row["converged"]  # a conv's output is linear in its weights
        assert abs(row["std_after"] / target - 1) < 0.01
    with open(tmp_path / "metrics.csv") as file:
        logged = next(csv.DictReader(file))
    assert math.isclose(float(logged["lsuv/0/std_after"]), lsuv.report[0]["std_after"], rel_tol=1e-6)
    assert float(logged["lsuv/7/iterations"]) == 1
    table = next(r.getMessage() for r in shown.records if "StreamingLSUV: per-channel std" in r.getMessage())
    assert "3 calibration batches" in table and "std before [min, max]" in table


def test_a_module_assigned_as_tile_transform_is_measured_through():
    """An nn.Module tile_transform lives in _modules (the mixin's class attribute would hide
    it): the calibration images must pass through it, as they do in training."""

    class Shift(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 30.0 + 7.0  # far from the untransformed images' statistics

    torch.manual_seed(0)
    model = Net(small_trunk())
    model.tile_transform = Shift()
    data = batches(2, (32, 32), seed=4)
    lsuv = ls.StreamingLSUV(num_batches=2, center=True, verbose=False)
    pl.Trainer(strategy=ls.StreamingStrategy(tile_size=24), max_steps=1, callbacks=[lsuv], **quiet()).fit(
        model, DataLoader(data, batch_size=None)
    )
    trunk = small_trunk()
    trunk.load_state_dict(model.start_state)
    moments = untiled_moments(trunk, [Shift()(x) for x, _ in data], "0")
    assert ((moments.std - 1).abs() <= 0.01).all() and (moments.mean.abs() <= 0.01).all(), moments.std


def test_grouped_and_transposed_convolutions_are_scaled_per_output_channel():
    # ConvTranspose keeps output channels in weight dimension 1, per group; not streamable, so conventional.
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3, bias=False),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Net(trunk)
    data = batches(2, (20, 24))
    lsuv = ls.StreamingLSUV(num_batches=2, target_std=0.7)
    pl.Trainer(max_steps=1, callbacks=[lsuv], **quiet()).fit(model, DataLoader(data, batch_size=None))
    for layer in convs(trunk):
        std = untiled_moments(model.trunk, [x for x, _ in data], layer).std
        torch.testing.assert_close(std, torch.full_like(std, 0.7), rtol=1e-3, atol=0)


def test_orthogonal_init_is_reproducible_and_leaves_the_random_state_alone():
    def fit(orthogonal: bool | None) -> Net:
        pl.seed_everything(7, verbose=False)
        model = Net(small_trunk())
        callbacks = [] if orthogonal is None else [ls.StreamingLSUV(num_batches=2, orthogonal_init=orthogonal)]
        loader = DataLoader(batches(3, (32, 32)), batch_size=None, shuffle=True)  # shuffling draws from the RNG
        pl.Trainer(strategy=ls.StreamingStrategy(tile_size=24), max_steps=1, callbacks=callbacks, **quiet()).fit(
            model, loader
        )
        return model

    plain, orthogonal, again = fit(None), fit(True), fit(True)
    assert torch.equal(plain.start_rng, orthogonal.start_rng)  # same data order and dropout masks as without it
    for name, value in orthogonal.start_state.items():
        assert torch.equal(value, again.start_state[name]), name
        if name.endswith("weight"):
            rows = value.flatten(1).double()
            gram = rows @ rows.T  # orthogonal rows stay orthogonal under per-row scaling
            if rows.shape[0] <= rows.shape[1]:
                off_diagonal = gram - torch.diag(gram.diagonal())
                assert off_diagonal.abs().max() < 1e-5 * gram.diagonal().max(), name
        if name.endswith("bias"):
            assert torch.count_nonzero(value) == 0  # zero biases stay zero
    assert not torch.equal(orthogonal.start_state["0.weight"], fit(False).start_state["0.weight"])


# ---------------------------------------------------------------------------------------------
# Errors


def test_arguments_are_checked_in_init():
    for kwargs, message in [
        ({"num_batches": 0}, "num_batches=...\\) must be a positive int"),
        ({"target_std": -1.0}, "target_std=...\\) must be a positive finite number"),
        ({"tolerance": 1.5}, "tolerance=...\\) must be a number in \\(0, 1\\)"),
        ({"max_iterations": 2.0}, "max_iterations=...\\) must be a positive int"),
        ({"layers": "0"}, "layers=...\\) must be None .* or a non-empty list"),
        ({"layers": ["0", "0"]}, "names a layer more than once"),
        ({"center": 1}, "center=...\\) must be True or False"),
        ({"input_fn": 3}, "input_fn=...\\) must be a callable"),
    ]:
        with pytest.raises(ValueError, match=message):
            ls.StreamingLSUV(**kwargs)


def test_setup_names_bad_layers_and_centring_without_bias():
    trainer = pl.Trainer(**quiet())
    model = Net(small_trunk(bias=False))
    with pytest.raises(ValueError, match="no submodule 'nope'; the trunk's convolutions are: \\['0', '2', '5', '7'\\]"):
        ls.StreamingLSUV(layers=["nope"]).setup(trainer, model, "fit")
    with pytest.raises(ValueError, match="must name convolutions .* '1' is a ReLU"):
        ls.StreamingLSUV(layers=["1"]).setup(trainer, model, "fit")
    with pytest.raises(ValueError, match="center=True.* \\['0', '2', '5', '7'\\] have no bias"):
        ls.StreamingLSUV(center=True).setup(trainer, model, "fit")
    with pytest.raises(TypeError, match="does not inherit it"):
        ls.StreamingLSUV().setup(trainer, pl.LightningModule(), "fit")
    lsuv = ls.StreamingLSUV(layers=["7", "2"])
    lsuv.setup(trainer, model, "fit")
    assert lsuv._chosen == ["2", "7"]  # the order the trunk runs them


def test_a_failed_measurement_raises_its_own_error():
    model = Net(small_trunk())
    lsuv = ls.StreamingLSUV(num_batches=1)
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=6), max_steps=1, callbacks=[lsuv], **quiet())
    with pytest.raises(ls.TileTooSmallError):
        trainer.fit(model, DataLoader(batches(1, (30, 30)), batch_size=None))
    with pytest.raises(TypeError, match="pass input_fn"):
        pl.Trainer(max_steps=1, callbacks=[ls.StreamingLSUV()], **quiet()).fit(
            Net(small_trunk()), DataLoader([{"image": torch.randn(1, 3, 8, 8)}], batch_size=None)
        )


# ---------------------------------------------------------------------------------------------
# Resuming


def test_resuming_from_a_checkpoint_skips_it(tmp_path, monkeypatch):
    data = DataLoader(batches(2, (32, 32)), batch_size=None)
    torch.manual_seed(0)
    first = Net(small_trunk(), lr=0.1)
    lsuv = ls.StreamingLSUV(num_batches=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=24), max_epochs=1, callbacks=[lsuv, checkpoint],
        **quiet(enable_checkpointing=True),
    ).fit(first, data)  # fmt: skip
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["callbacks"]["StreamingLSUV"] == {"calibrated": True, "report": lsuv.report}

    def not_again(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("StreamingLSUV measured a layer in a resumed run")

    monkeypatch.setattr(ls.StreamingLSUV, "layer_moments", not_again)
    torch.manual_seed(1)  # different initial weights: the checkpoint's must win
    resumed, again = Net(small_trunk(), lr=0.1), ls.StreamingLSUV(num_batches=2)
    pl.Trainer(strategy=ls.StreamingStrategy(tile_size=24), max_epochs=2, callbacks=[again], **quiet()).fit(
        resumed, data, ckpt_path=tmp_path / "last.ckpt"
    )
    for name, value in resumed.start_state.items():
        assert torch.equal(value, saved["state_dict"][f"trunk.{name}"]), name
    assert again.report == lsuv.report and again.state_dict()["calibrated"]


# ---------------------------------------------------------------------------------------------
# A deep trunk without BatchNorm


@pytest.mark.slow
def test_deep_trunk_vanishes_without_lsuv_and_trains_with_it():
    data = batches(60, (32, 32), seed=5, batch_size=8, shift=1.0)
    calibration = [x for x, _ in data[:5]]

    def fit(lsuv: bool) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        model = Net(deep_trunk(), lr=0.05, momentum=0.9)
        callbacks = [ls.StreamingLSUV(num_batches=5)] if lsuv else []
        trainer = pl.Trainer(
            strategy=ls.StreamingStrategy(tile_size=64), max_epochs=1, gradient_clip_val=1.0, callbacks=callbacks,
            **quiet(),
        )  # fmt: skip
        trainer.fit(model, DataLoader(data, batch_size=None))
        trunk = deep_trunk()
        trunk.load_state_dict(model.start_state)
        with torch.no_grad():
            return torch.tensor(model.losses), torch.cat([trunk(x) for x in calibration]).std().item()

    plain, plain_std = fit(False)
    calibrated, calibrated_std = fit(True)
    assert plain_std < 1e-5  # sixteen default-initialised layers: the signal has vanished
    assert 0.5 < calibrated_std < 2
    assert torch.isfinite(calibrated).all()
    first, last = calibrated[:15].mean(), calibrated[-15:].mean()
    assert last < 0.3 and last < 0.5 * first, calibrated  # it learns
    assert plain[-15:].mean() > 0.65, plain  # it does not: chance level is ln 2 = 0.69


# ---------------------------------------------------------------------------------------------
# Two processes

DDP_SHAPES = [(52, 40), (36, 60)]  # rank 0 and rank 1: different image sizes and tile counts
DDP_TILE = 28


def ddp_model(record_dir: str | None = None) -> Net:
    torch.manual_seed(0)
    return Net(small_trunk(), record_dir=record_dir).double()  # double before a checkpoint or precision touches it


def rank_batches(rank: int) -> list:
    return batches(2, DDP_SHAPES[rank], seed=10 + rank, dtype=torch.float64)


class RankLoader(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(rank_batches(self.trainer.global_rank), batch_size=None)


def ddp_worker(local_rank: int, root: str, port: int) -> None:
    join_as_torchrun_rank(local_rank, port)
    try:
        strategy = ls.StreamingDDPStrategy(
            tile_size=DDP_TILE, process_group_backend="gloo", timeout=timedelta(seconds=120)
        )
        trainer = pl.Trainer(
            strategy=strategy, max_steps=1, precision="64-true", use_distributed_sampler=False,
            callbacks=[ls.StreamingLSUV(num_batches=2, center=True)], **quiet(devices=2),
        )  # fmt: skip
        trainer.fit(ddp_model(root), RankLoader())
    except Exception:
        Path(root, f"rank{local_rank}.error").write_text(traceback.format_exc())
    finally:
        leave_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_union_of_their_batches(tmp_path):
    mp.start_processes(ddp_worker, args=(str(tmp_path), find_free_network_port()), nprocs=2, start_method="spawn")
    errors = sorted(tmp_path.glob("*.error"))
    assert not errors, errors[0].read_text()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"ranks differ in {name}"

    # One process, streamed, both ranks' batches.
    single = ddp_model()
    union = rank_batches(0) + rank_batches(1)
    pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=DDP_TILE), max_steps=1, precision="64-true",
        callbacks=[ls.StreamingLSUV(num_batches=4, center=True)], **quiet(),
    ).fit(single, DataLoader(union, batch_size=None))  # fmt: skip
    initial = ddp_model().trunk.state_dict()
    for name, value in single.start_state.items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.allclose(value, initial[name]), f"{name} was not rescaled"
    assert [row["iterations"] for row in ranks[0]["report"]] == [1, 1, 1, 1]
