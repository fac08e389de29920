"""Exact multi-process training: "streaming_ddp" on CPU with gloo and 2 processes.

Each test spawns 2 worker processes (a few seconds each). Workers are started with
start_method="spawn": the default "popen" launcher re-runs the current command line in
its workers, which under pytest would re-run the test session, and "fork" copies a parent
whose OpenMP/intra-op thread pools are already running, which can deadlock. Spawned
workers import the model and data from ``test_lightning_helpers`` (the tests directory is
on sys.path, which spawn passes on), and save their final state to files the test reads.
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from test_lightning_helpers import one_thread, RankData, TinyClassifier, tiny_trunk, trainer_kwargs

import lightning_streaming as ls

assert one_thread  # an autouse fixture, imported to apply here

pytestmark = pytest.mark.slow

TILE = 24
SHAPES = [(64, 48), (40, 56)]  # rank 0 and rank 1: different image sizes and tile counts
MICRO = 2  # micro-batches per optimizer step (accumulate_grad_batches), one optimizer step per epoch
EPOCHS = 2
LR, GAMMA = 0.1, 0.5


def ddp_fit(
    record_dir: str, epochs: int = EPOCHS, ckpt_path: str | None = None, callbacks=(), accumulate: int = MICRO, **ddp_kwargs
) -> None:
    # Double from the start: Lightning restores a checkpoint before precision="64-true" converts the
    # model, so a float32 model would round the restored weights to float32.
    model = TinyClassifier(lr=LR, scheduler=True, record_dir=record_dir, count_allreduce=True).double()
    strategy = ls.StreamingDDPStrategy(
        tile_size=TILE, start_method="spawn", process_group_backend="gloo", **ddp_kwargs
    )
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        precision="64-true",
        use_distributed_sampler=False,  # RankData gives each rank its own batches
        **trainer_kwargs(devices=2, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)),
    )
    trainer.fit(model, RankData(SHAPES, MICRO), ckpt_path=ckpt_path)


def records(record_dir: str) -> list[dict]:
    return [torch.load(os.path.join(record_dir, f"rank{r}.pt")) for r in range(2)]


def parameters(record: dict) -> dict[str, torch.Tensor]:
    names = {name for name, _ in TinyClassifier().named_parameters()}
    return {k: v for k, v in record["state"].items() if k in names}


def conventional_reference(accumulate: int = MICRO) -> dict[str, torch.Tensor]:
    """One process, no streaming, float64: each optimizer step on the mean loss over the
    union of both ranks' micro-batches (DDP averages over ranks, Lightning over micro-steps)."""
    model = TinyClassifier(lr=LR).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=GAMMA)  # steps once per epoch
    per_rank = [RankData(SHAPES, MICRO).batches(rank) for rank in range(2)]
    for _ in range(EPOCHS):
        for start in range(0, MICRO, accumulate):
            union = [batch for batches in per_rank for batch in batches[start : start + accumulate]]
            optimizer.zero_grad()
            loss = sum(F.cross_entropy(model(x.double()), y) for x, y in union) / len(union)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    record_dir = str(tmp_path_factory.mktemp("ddp_uninterrupted"))
    ddp_fit(record_dir)
    return records(record_dir)


def assert_exact_ddp(ranks: list[dict], accumulate: int = MICRO) -> None:
    first, second = parameters(ranks[0]), parameters(ranks[1])
    for name in first:
        assert torch.equal(first[name], second[name]), f"ranks differ in {name}"
    reference = conventional_reference(accumulate)
    initial = dict(TinyClassifier().double().named_parameters())
    for name, value in first.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.allclose(value, initial[name]), f"{name} did not train"


def test_ranks_agree_and_equal_conventional_step_on_union(uninterrupted):
    # The images of the two ranks really are tiled differently.
    plans = [ls.tile_plan(tiny_trunk(), (2, 3, *shape), TILE) for shape in SHAPES]
    assert len(plans[0]) > 1 and len(plans[1]) > 1 and plans[0].grid != plans[1].grid
    for record in uninterrupted:
        assert record["streamed_steps"] == [True] * (MICRO * EPOCHS)
    assert_exact_ddp(uninterrupted)


def test_accumulation_micro_steps_skip_the_allreduce(uninterrupted):
    # A counting comm hook: gradients are all-reduced once per optimizer step (one bucket
    # for this tiny model), never on the first micro-step, which runs under no_sync.
    for record in uninterrupted:
        assert record["allreduce_after_batch"] == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "ddp_kwargs, accumulate",
    [
        # PyTorch's DDP fails with static_graph=True and no_sync (accumulation) even without
        # streaming (pytorch/pytorch#143580), so static_graph is tested without accumulation.
        ({"static_graph": True}, 1),
        ({"find_unused_parameters": True}, MICRO),
    ],
    ids=["static_graph", "find_unused_parameters"],
)
def test_static_graph_and_find_unused_parameters(tmp_path, ddp_kwargs, accumulate):
    # The trunk's parameters are inputs of the streamed autograd function, so DDP sees them
    # used (none is reported unused), and a static graph's delayed all-reduce is exact too.
    ddp_fit(str(tmp_path), accumulate=accumulate, **ddp_kwargs)
    ranks = records(str(tmp_path))
    assert_exact_ddp(ranks, accumulate)
    expected = list(range(1, 2 * MICRO // accumulate + 1)) if accumulate == 1 else [0, 1, 1, 2]
    assert ranks[0]["allreduce_after_batch"] == expected


def test_checkpoint_resume_continue_equals_uninterrupted(tmp_path, uninterrupted):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    ddp_fit(str(first), epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    ddp_fit(str(second), epochs=EPOCHS, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = records(str(second))
    assert resumed[0]["training_steps_run"] == MICRO  # only the second epoch ran
    for rank in range(2):
        expected, actual = parameters(uninterrupted[rank]), parameters(resumed[rank])
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)


def test_refused_trunk_fails_at_fit_start(tmp_path):
    # BatchNorm in training mode in the trunk: every worker fails in strategy.setup, before
    # DDP wraps the model and before any step, with the core's message.
    model = TinyClassifier(norm="batchnorm", record_dir=str(tmp_path))
    strategy = ls.StreamingDDPStrategy(tile_size=TILE, start_method="spawn", process_group_backend="gloo")
    trainer = pl.Trainer(strategy=strategy, max_epochs=1, use_distributed_sampler=False, **trainer_kwargs(devices=2))
    with pytest.raises(Exception, match="NotLocalError: cannot stream module '2' \\(BatchNorm2d\\)") as info:
        trainer.fit(model, RankData(SHAPES, MICRO))
    assert "_check_model" in str(info.value)
    assert not os.listdir(tmp_path)  # no worker reached the end of training
