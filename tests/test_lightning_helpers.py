"""Models and data shared by the Lightning tests (no tests here).

They live at module level so that DDP worker processes started with "spawn" can unpickle
them by importing this module (the tests directory is on sys.path, which spawned
children inherit).
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lightning_streaming as ls

NUM_CLASSES = 3


def tiny_trunk(norm: str | None = None) -> nn.Sequential:
    """Local layers only (unless ``norm="batchnorm"``, which streaming refuses in training)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    if norm == "batchnorm":
        layers.append(nn.BatchNorm2d(4))
    layers += [
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
    ]  # fmt: skip
    return nn.Sequential(*layers)


def tiny_head() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))


class TinyClassifier(ls.StreamingMixin, pl.LightningModule):
    """A streaming classifier; with ``record_dir`` it saves each rank's final state and the
    number of DDP all-reduce calls after every batch."""

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.1,
        optimizer: str = "sgd",
        scheduler: bool = False,
        norm: str | None = None,
        record_dir: str | None = None,
        count_allreduce: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.trunk = tiny_trunk(norm)
        self.head = tiny_head()
        self.training_steps_run = 0
        self.allreduce_calls = 0
        self.allreduce_after_batch: list[int] = []
        self.autocast_seen: list[bool] = []
        self.streamed_steps: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps_run += 1
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        self.streamed_steps.append(self.streaming_settings is not None)
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd_momentum":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        elif self.hparams.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}

    def on_train_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = self.trainer.model
        if self.hparams.count_allreduce and isinstance(ddp, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_allreduce(state, bucket):  # DDP checks annotations: leave them out
                self.allreduce_calls += 1
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_allreduce)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.allreduce_after_batch.append(self.allreduce_calls)

    def on_train_end(self) -> None:
        if self.hparams.record_dir:
            record = {
                "state": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "allreduce_after_batch": self.allreduce_after_batch,
                "training_steps_run": self.training_steps_run,
                "streamed_steps": self.streamed_steps,
            }
            torch.save(record, os.path.join(self.hparams.record_dir, f"rank{self.global_rank}.pt"))


def make_batches(rank: int, count: int, shape: tuple[int, int], batch_size: int = 2, seed: int = 1) -> list:
    """``count`` (image, label) batches for one rank: images with a class-dependent stripe."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    batches = []
    for _ in range(count):
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        x = torch.randn(batch_size, 3, *shape, generator=generator)
        for i, label in enumerate(y.tolist()):
            x[i, label, :, shape[1] // 3 : shape[1] // 2] += 1.0
        batches.append((x, y))
    return batches


class RankData(pl.LightningDataModule):
    """Each rank gets its own batches, of its own image size (``shapes[rank]``)."""

    def __init__(self, shapes: list[tuple[int, int]], count: int, batch_size: int = 2) -> None:
        super().__init__()
        self.shapes, self.count, self.batch_size = shapes, count, batch_size

    def batches(self, rank: int) -> list:
        return make_batches(rank, self.count, self.shapes[rank], self.batch_size)

    def _loader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(self.batches(rank), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def trainer_kwargs(**overrides: Any) -> dict:
    """Quiet, fast Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return kwargs


def join_as_torchrun_rank(local_rank: int, port: int, world_size: int = 2) -> None:
    """Set the environment torchrun gives rank ``local_rank`` of a one-node job (so Lightning
    joins that process group instead of launching its own), one thread per process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), NODE_RANK="0",
        RANK=str(local_rank), LOCAL_RANK=str(local_rank),
    )  # fmt: skip
    torch.set_num_threads(1)


def leave_process_group() -> None:
    """Destroy the worker's process group before it exits: gloo's threads still running when
    the interpreter shuts down can abort the process ("terminate called without an active
    exception", SIGABRT), failing a run that had succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
