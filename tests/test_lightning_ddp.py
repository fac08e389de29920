"""Exact multi-process training: "streaming_ddp" on CPU with gloo and 2 processes.

Starting a process that imports torch and Lightning costs seconds, so most scenarios run
in ONE pair of worker processes, launched the way torchrun launches them: the test spawns
2 workers with MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and LOCAL_RANK set, and in each
worker ``Trainer(strategy=StreamingDDPStrategy(...), devices=2)`` sees an externally
launched job (Lightning's default cluster environment) and runs its fits in-process, one
after another, on one process group. Each fit saves every rank's final state to a file the
tests read. One more test uses Lightning's own launcher with start_method="spawn" (the
"streaming_ddp_spawn" path, which pickles the Trainer, strategy and model).

Why not the other launchers inside pytest: the default "popen" launcher re-runs the current
command line in its workers, which here would re-run the test session, and "fork" copies a
parent whose OpenMP/intra-op thread pools are already running, which can deadlock.
Workers import the model and data from ``test_lightning_helpers`` (the tests directory is
on sys.path, which spawn passes on).
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from pytorch_lightning.callbacks import ModelCheckpoint
from test_lightning_helpers import (
    RankData,
    TinyClassifier,
    join_as_torchrun_rank,
    leave_process_group,
    tiny_trunk,
    trainer_kwargs,
)

import lightning_streaming as ls


pytestmark = pytest.mark.slow

TILE = 24
SHAPES = [(64, 48), (40, 56)]  # rank 0 and rank 1: different image sizes and tile counts
MICRO = 2  # micro-batches per rank and epoch
EPOCHS = 2
LR, GAMMA = 0.1, 0.5


def ddp_fit(
    record_dir: Path,
    *,
    epochs: int = EPOCHS,
    accumulate: int = MICRO,
    ckpt_path: Path | None = None,
    callbacks: tuple = (),
    norm: str | None = None,
    **ddp_kwargs,
) -> None:
    """A float64 streamed DDP fit on RankData, one optimizer step per epoch when accumulating."""
    record_dir.mkdir(parents=True, exist_ok=True)
    # Double from the start: Lightning restores a checkpoint before precision="64-true" converts
    # the model, so a float32 model would round the restored weights to float32.
    model = TinyClassifier(lr=LR, scheduler=True, norm=norm, record_dir=str(record_dir), count_allreduce=True).double()
    # A short timeout turns a collective mismatch into an error instead of a hung test.
    ddp_kwargs = {"process_group_backend": "gloo", "timeout": timedelta(seconds=120), **ddp_kwargs}
    trainer = pl.Trainer(
        strategy=ls.StreamingDDPStrategy(tile_size=TILE, **ddp_kwargs),
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        precision="64-true",
        use_distributed_sampler=False,  # RankData gives each rank its own batches
        **trainer_kwargs(devices=2, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)),
    )
    trainer.fit(model, RankData(SHAPES, MICRO), ckpt_path=ckpt_path)


def scenarios(root: Path) -> dict:
    checkpoint = root / "checkpoint"
    return {
        "uninterrupted": lambda: ddp_fit(root / "uninterrupted"),
        # PyTorch's DDP fails with static_graph=True and no_sync (accumulation) even without
        # streaming (pytorch/pytorch#143580), so static_graph runs without accumulation.
        "static_graph": lambda: ddp_fit(root / "static_graph", accumulate=1, static_graph=True),
        "find_unused_parameters": lambda: ddp_fit(root / "find_unused_parameters", find_unused_parameters=True),
        "first_epoch": lambda: ddp_fit(
            root / "first_epoch", epochs=1, callbacks=(ModelCheckpoint(dirpath=checkpoint, filename="last"),)
        ),
        "resumed": lambda: ddp_fit(root / "resumed", ckpt_path=checkpoint / "last.ckpt"),
        "refused": lambda: ddp_fit(root / "refused", norm="batchnorm"),  # last: it fails on purpose
    }


def torchrun_style_worker(local_rank: int, root: str, port: int) -> None:
    join_as_torchrun_rank(local_rank, port)
    for name, run in scenarios(Path(root)).items():
        try:
            run()
        except Exception:
            (Path(root) / name).mkdir(parents=True, exist_ok=True)
            (Path(root) / name / f"rank{local_rank}.error").write_text(traceback.format_exc())
    leave_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(torchrun_style_worker, args=(str(root), find_free_network_port()), nprocs=2, start_method="spawn")
    return root


def records(record_dir: Path) -> list[dict]:
    errors = sorted(record_dir.glob("*.error"))
    assert not errors, errors[0].read_text()
    return [torch.load(record_dir / f"rank{rank}.pt") for rank in range(2)]


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


def assert_exact_ddp(ranks: list[dict], accumulate: int = MICRO) -> None:
    """Both ranks hold identical parameters, equal to the conventional reference."""
    first, second = parameters(ranks[0]), parameters(ranks[1])
    for name in first:
        assert torch.equal(first[name], second[name]), f"ranks differ in {name}"
    reference = conventional_reference(accumulate)
    initial = dict(TinyClassifier().double().named_parameters())
    for name, value in first.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.allclose(value, initial[name]), f"{name} did not train"
    for record in ranks:
        assert record["streamed_steps"] == [True] * (MICRO * EPOCHS)


def test_ranks_agree_and_equal_conventional_step_on_union(runs):
    # The images of the two ranks really are tiled differently.
    plans = [ls.tile_plan(tiny_trunk(), (2, 3, *shape), TILE) for shape in SHAPES]
    assert len(plans[0]) > 1 and len(plans[1]) > 1 and plans[0].grid != plans[1].grid
    assert_exact_ddp(records(runs / "uninterrupted"))


def test_accumulation_micro_steps_skip_the_allreduce(runs):
    # A counting comm hook: gradients are all-reduced once per optimizer step (one bucket
    # for this tiny model), never on the first micro-step, which runs under no_sync.
    for record in records(runs / "uninterrupted"):
        assert record["allreduce_after_batch"] == [0, 1, 1, 2]


@pytest.mark.parametrize("name, accumulate", [("static_graph", 1), ("find_unused_parameters", MICRO)])
def test_static_graph_and_find_unused_parameters(runs, name, accumulate):
    # The trunk's parameters are inputs of the streamed autograd function, so DDP sees them
    # used (none is reported unused), and a static graph's delayed all-reduce is exact too.
    ranks = records(runs / name)
    assert_exact_ddp(ranks, accumulate)
    assert ranks[0]["allreduce_after_batch"] == ([1, 2, 3, 4] if accumulate == 1 else [0, 1, 1, 2])


def test_checkpoint_resume_continue_equals_uninterrupted(runs):
    uninterrupted, resumed = records(runs / "uninterrupted"), records(runs / "resumed")
    assert resumed[0]["training_steps_run"] == MICRO  # only the second epoch ran
    for rank in range(2):
        expected, actual = parameters(uninterrupted[rank]), parameters(resumed[rank])
        for name in expected:
            assert torch.equal(actual[name], expected[name]), name


def test_refused_trunk_fails_at_fit_start(runs):
    # BatchNorm in training mode in the trunk: every worker fails in strategy.setup, before
    # DDP wraps the model and before any step, with the core's message.
    for rank in range(2):
        error = (runs / "refused" / f"rank{rank}.error").read_text()
        assert "NotLocalError: cannot stream module '2' (BatchNorm2d)" in error and "in _check_model" in error
        assert "training_step" not in error
    assert not list((runs / "refused").glob("*.pt"))  # no worker reached the end of training


def test_lightning_spawn_launcher_is_exact(tmp_path):
    # Trainer(strategy="streaming_ddp_spawn") path: Lightning spawns and pickles everything.
    ddp_fit(tmp_path, start_method="spawn")
    ranks = records(tmp_path)
    assert_exact_ddp(ranks)
    assert ranks[1]["allreduce_after_batch"] == [0, 1, 1, 2]
