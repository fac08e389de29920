"""The "streaming" strategy in one process: same training as conventional, every stage streams."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import StrategyRegistry
from test_lightning_helpers import RankData, TinyClassifier, trainer_kwargs
from torch import nn

import lightning_streaming as ls

from lightning_streaming.lightning import settings as settings_module

TILE = 24
SHAPE = (64, 48)


@pytest.fixture
def stream_calls(monkeypatch) -> list[dict]:
    """Records every call the strategies make to the core's stream()."""
    calls: list[dict] = []
    original = settings_module.stream

    def spy(module, input, tile_size, **kwargs):
        budget = kwargs.get("memory_budget")
        plan = ls.stream_plan(module, input.shape, tile_size, memory_budget=budget, input_dtype=input.dtype)
        calls.append(dict(tile_size=tile_size, grad=torch.is_grad_enabled(), plan=len(plan.tiles), **kwargs))
        return original(module, input, tile_size, **kwargs)

    monkeypatch.setattr(settings_module, "stream", spy)
    return calls


def fit(strategy, batches: int = 4, shape=SHAPE, precision="64-true", model=None, **kwargs) -> TinyClassifier:
    model = model if model is not None else TinyClassifier(**kwargs.pop("model_kwargs", {}))
    if precision == "64-true":
        model = model.double()
    trainer = pl.Trainer(strategy=strategy, max_epochs=kwargs.pop("max_epochs", 1), precision=precision, **trainer_kwargs(**kwargs))
    trainer.fit(model, RankData([shape], batches))
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    initial = dict(TinyClassifier().double().named_parameters())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=name)
        assert not torch.allclose(pa.double(), initial[name]), f"{name} did not train"


# ----------------------------------------------------------------------------- registry


def test_registry_names_resolve():
    for name in ("streaming", "streaming_ddp", "streaming_ddp_spawn"):
        assert name in StrategyRegistry.available_strategies()
    single = pl.Trainer(strategy="streaming", accelerator="cpu", devices=1, logger=False).strategy
    assert type(single) is ls.StreamingStrategy and single.root_device == torch.device("cpu")
    ddp = pl.Trainer(strategy="streaming_ddp", accelerator="cpu", devices=2, logger=False).strategy
    assert type(ddp) is ls.StreamingDDPStrategy and ddp._start_method == "popen" and ddp.num_processes == 2
    spawn = pl.Trainer(strategy="streaming_ddp_spawn", accelerator="cpu", devices=2, logger=False).strategy
    assert type(spawn) is ls.StreamingDDPStrategy and spawn._start_method == "spawn"


def test_single_device_strategy_refuses_several_devices():
    with pytest.raises(ValueError, match="runs on one device.*streaming_ddp"):
        pl.Trainer(strategy="streaming", accelerator="cpu", devices=2, logger=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile_size=0), "tile_size must be a positive int"),
        (dict(tile_size="big"), "tile_size must be a positive int"),
        (dict(tile_size="auto"), "needs memory_budget"),
        (dict(tile_size="auto", memory_budget="lots"), "is not a size"),
        (dict(keep_graphs=-1), "keep_graphs must be None .* or a non-negative int"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, message):
    for cls in (ls.StreamingStrategy, ls.StreamingDDPStrategy):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


def test_settings_parse_budgets_and_tuples():
    strategy = ls.StreamingDDPStrategy(tile_size="auto", memory_budget="1.5GiB", keep_graphs=2, start_method="spawn")
    assert strategy.streaming.memory_budget == int(1.5 * 2**30) and strategy.streaming.keep_graphs == 2
    assert ls.StreamingStrategy(tile_size=[32, 48]).streaming.tile_size == (32, 48)


# ------------------------------------------------------------------------- training


def test_streamed_fit_equals_conventional_fit(stream_calls):
    streamed = fit(ls.StreamingStrategy(tile_size=TILE))
    assert len(stream_calls) == 4 and all(c["grad"] and c["plan"] > 1 and c["tile_size"] == TILE for c in stream_calls)
    conventional = fit("auto")
    assert len(stream_calls) == 4  # the conventional run never streamed
    assert_same_parameters(streamed, conventional)


def test_accumulation_clipping_optimizer_and_scheduler_unchanged(stream_calls):
    # Adam with a step scheduler, 2 micro-batches per step, gradient norm clipped (the clip
    # value is small enough that clipping is active on every step).
    options = dict(
        accumulate_grad_batches=2, gradient_clip_val=1e-3, max_epochs=2,
        model_kwargs=dict(optimizer="adam", scheduler=True, lr=0.01),
    )  # fmt: skip
    streamed = fit(ls.StreamingStrategy(tile_size=TILE), **options)
    assert len(stream_calls) == 8
    conventional = fit("auto", **options)
    assert_same_parameters(streamed, conventional)


def test_model_default_tile_size_and_strategy_override(stream_calls):
    class WithDefault(TinyClassifier):
        default_tile_size = 32

    fit("streaming", batches=1, model=WithDefault())
    fit(ls.StreamingStrategy(tile_size=(20, 28)), batches=1, model=WithDefault())
    fit("streaming", batches=1)
    assert [c["tile_size"] for c in stream_calls] == [32, (20, 28), settings_module.DEFAULT_TILE_SIZE]


def test_keep_graphs_is_passed_and_exact(stream_calls):
    fit("streaming", batches=1)
    assert "keep_graphs" not in stream_calls[0]  # None: stream()'s own default
    streamed = fit(ls.StreamingStrategy(tile_size=TILE, keep_graphs=2))
    assert all(c["keep_graphs"] == 2 for c in stream_calls[1:])
    assert_same_parameters(streamed, fit("auto"))


def test_bf16_mixed_streams_under_autocast_and_stays_close(stream_calls):
    def deviation(a: nn.Module, b: nn.Module) -> float:
        return max((pa.float() - pb.float()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))

    for batches in (1, 4):
        streamed = fit(ls.StreamingStrategy(tile_size=TILE), batches=batches, precision="bf16-mixed")
        assert streamed.autocast_seen == [True] * batches
        conventional = fit("auto", batches=batches, precision="bf16-mixed")
        reference = fit("auto", batches=batches, precision="64-true")
        bf16_error = deviation(conventional, reference)
        if batches == 1:
            # One step: streaming adds far less than bf16 itself does (bf16 rounding of the
            # per-tile parameter gradients, summed in float32).
            assert deviation(streamed, conventional) < 0.1 * bf16_error
        else:
            # Over steps bf16 noise compounds either way: streamed bf16 training stays as
            # close to float64 training as conventional bf16 training does.
            assert deviation(streamed, reference) < 3 * bf16_error
    assert len(stream_calls) == 5


def test_validate_test_predict_stream_without_graphs(stream_calls):
    model = fit(ls.StreamingStrategy(tile_size=TILE), batches=2, limit_val_batches=2)
    stages = len(stream_calls)
    assert stages == 2 + 2  # two training steps, one validation epoch of two batches at the end
    data = RankData([SHAPE], 2)
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=TILE), precision="64-true", **trainer_kwargs(limit_val_batches=None)
    )
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    streamed = torch.cat(trainer.predict(model, data))
    evaluation = stream_calls[stages:]
    assert len(evaluation) == 6 and not any(c["grad"] for c in evaluation)
    conventional = pl.Trainer(precision="64-true", **trainer_kwargs()).predict(model, data)
    torch.testing.assert_close(streamed, torch.cat(conventional), rtol=1e-12, atol=1e-12)


def test_checkpoint_resume_continue_equals_uninterrupted(tmp_path):
    # Adam: the optimizer state must survive the checkpoint too.
    options = dict(max_epochs=2, accumulate_grad_batches=2, model_kwargs=dict(optimizer="adam", scheduler=True, lr=0.01))
    uninterrupted = fit(ls.StreamingStrategy(tile_size=TILE), **options)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit(ls.StreamingStrategy(tile_size=TILE), **{**options, "max_epochs": 1}, callbacks=[checkpoint], enable_checkpointing=True)
    model = TinyClassifier(optimizer="adam", scheduler=True, lr=0.01).double()
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=TILE), max_epochs=2, accumulate_grad_batches=2,
        precision="64-true", **trainer_kwargs(),
    )  # fmt: skip
    trainer.fit(model, RankData([SHAPE], 4), ckpt_path=str(tmp_path / "last.ckpt"))
    assert model.training_steps_run == 4  # the second epoch only
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------- refused at start


def test_refused_trunk_fails_at_fit_start():
    model = TinyClassifier(norm="batchnorm")
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=TILE), **trainer_kwargs())
    with pytest.raises(ls.NotLocalError, match=r"cannot stream module '2' \(BatchNorm2d\).*eval mode"):
        trainer.fit(model, RankData([SHAPE], 2))
    assert model.training_steps_run == 0
    # Conventionally the same model trains; frozen (eval-mode) BatchNorm streams.
    fit("auto", batches=1, model=TinyClassifier(norm="batchnorm"))
    frozen = TinyClassifier(norm="batchnorm")
    frozen.trunk[2].eval()
    fit(ls.StreamingStrategy(tile_size=TILE), batches=1, model=frozen)
    assert frozen.training_steps_run == 1


def test_tile_too_small_for_example_input_fails_at_fit_start():
    model = TinyClassifier()
    model.example_input_array = torch.zeros(2, 3, *SHAPE)
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=4), **trainer_kwargs())
    with pytest.raises(ls.TileTooSmallError, match="minimum usable tile"):
        trainer.fit(model, RankData([SHAPE], 2))
    assert model.training_steps_run == 0


def test_model_without_mixin_or_trunk_is_refused_with_the_fix():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Conv2d(3, 3, 3)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"does not inherit it: declare it as class Plain\(lightning_streaming.StreamingMixin"):
        pl.Trainer(strategy="streaming", **trainer_kwargs()).fit(Plain(), RankData([SHAPE], 1))

    class NoHead(ls.StreamingMixin, Plain):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Conv2d(3, 3, 3)

    with pytest.raises(AttributeError, match="has no module attribute 'head'.*split_at"):
        pl.Trainer(strategy="streaming", **trainer_kwargs()).fit(NoHead(), RankData([SHAPE], 1))


# --------------------------------------------------------------------- placement, auto


class RecordsTransfer(TinyClassifier):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.transferred = batch
        return batch


def test_input_on_host_keeps_images_where_they_are():
    # "meta" stands in for an accelerator: labels go there, image-shaped tensors stay.
    model = RecordsTransfer()
    trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=TILE, input_on_host=True), **trainer_kwargs())
    trainer.strategy.connect(model)
    model.trainer = trainer
    image, label = torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    moved = trainer.strategy.batch_to_device({"x": image, "y": label}, torch.device("meta"))
    assert moved["x"] is image and moved["y"].device.type == "meta"
    assert model.transferred is moved  # the user's on_after_batch_transfer hook still runs


def test_input_on_host_training_is_exact(stream_calls):
    streamed = fit(ls.StreamingStrategy(tile_size=TILE, input_on_host=True), batches=2)
    assert_same_parameters(streamed, fit("auto", batches=2))


def test_memory_budget_plans_the_tiles_and_training_stays_exact(stream_calls):
    shape = (2, 3, 256, 192)
    budget = 6 * 2**20
    streamed = fit(ls.StreamingStrategy(tile_size="auto", memory_budget=budget), batches=2, shape=shape[2:])
    first = stream_calls[0]
    assert first["tile_size"] == "auto" and first["memory_budget"] == budget
    trunk = TinyClassifier().trunk.double()
    plan = ls.stream_plan(trunk, shape, memory_budget=budget, input_dtype=torch.float64)
    assert len(plan.tiles) == first["plan"] > 1 and plan.predicted_bytes <= budget
    settings = ls.StreamingStrategy(tile_size="auto", memory_budget=budget).streaming
    x = torch.zeros(shape, dtype=torch.float64)
    assert settings.plan(trunk, x, torch.device("cpu")) == plan  # what the strategy shows is what it ran
    assert settings.resolve_tile_size(trunk, x, torch.device("cpu")) == plan.tile_size  # e.g. for LSUV
    assert_same_parameters(streamed, fit("auto", batches=2, shape=shape[2:]))


def test_memory_budget_with_an_explicit_tile_size_chooses_only_the_rest(stream_calls):
    strategy = ls.StreamingStrategy(tile_size=64, memory_budget="1GiB")
    assert not strategy.streaming.planned
    assert ls.StreamingStrategy(memory_budget="1GiB").streaming.planned  # no tile size: the planner's
    fit(strategy, batches=1)
    (call,) = stream_calls
    assert call["tile_size"] == 64 and call["memory_budget"] == 2**30


def test_lightning_cli_selects_the_strategies(monkeypatch):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (pytorch-lightning[extra])")
    from pytorch_lightning.cli import LightningCLI

    def strategy(*args: str):
        monkeypatch.setattr("sys.argv", ["train.py", *args])
        return LightningCLI(TinyClassifier, run=False, save_config_callback=None).trainer.strategy

    assert type(strategy("--trainer.strategy=streaming", "--trainer.accelerator=cpu")) is ls.StreamingStrategy
    chosen = strategy(
        "--trainer.strategy=lightning_streaming.StreamingDDPStrategy", "--trainer.strategy.tile_size=auto",
        "--trainer.strategy.memory_budget=2GiB", "--trainer.accelerator=cpu", "--trainer.devices=2",
    )  # fmt: skip
    assert type(chosen) is ls.StreamingDDPStrategy and chosen.streaming.memory_budget == 2**31


def test_lightning_cli_builds_the_slide_datamodule(monkeypatch):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (pytorch-lightning[extra])")
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["train.py", "--data.train=train.csv", "--data.spacing=8",
                                     "--data.tissue.spacing=16", "--trainer.accelerator=cpu"])  # fmt: skip
    cli = LightningCLI(TinyClassifier, ls.SlideDataModule, run=False, save_config_callback=None)
    assert isinstance(cli.datamodule, pl.LightningDataModule) and isinstance(cli.datamodule, ls.SlideDataModule)
    assert cli.datamodule.tissue == ls.TissueDetection(spacing=16.0) and cli.datamodule.hparams.tissue["spacing"] == 16
