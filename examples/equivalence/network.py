"""The paper's Table II network as a LightningModule: the first two blocks are the trunk."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_streaming as ls

__all__ = ["TableTwoNet"]


def _block(channels_in: int, channels_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # "Same" padding: with the stride-2 stem, a 320 x 320 input reaches the last pool at 10 x 10.
    return [nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]


class TableTwoNet(ls.StreamingMixin, pl.LightningModule):
    """Table II: five blocks of convolution, ReLU and max-pool, then a linear classifier.

    ``trunk`` (streamed under a streaming strategy) is the first two blocks: 7x7 convolution
    to 16 channels with stride 2, 2x2 max-pool, 3x3 convolution to 32 channels, 2x2 max-pool.
    ``head`` is the other three blocks (3x3 convolutions to 64, 128 and 256 channels, the
    last pool global) and the fully connected layer. Training losses of every step, and the
    tuning loss and accuracy of every epoch, are recorded in plain lists.

    Args:
        classes: output classes.
        lr: SGD learning rate (the paper's is 1e-3).
        momentum: SGD momentum (the paper names none).
    """

    def __init__(self, classes: int, lr: float = 1e-3, momentum: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(
            *_block(3, 16, 7, stride=2), nn.MaxPool2d(2),
            *_block(16, 32, 3), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(
            *_block(32, 64, 3), nn.MaxPool2d(2),
            *_block(64, 128, 3), nn.MaxPool2d(2),
            *_block(128, 256, 3),
            nn.AdaptiveMaxPool2d(1),  # the paper's 10x10 max-pool at 320 x 320, global at any size
            nn.Flatten(),
            nn.Linear(256, classes),
        )  # fmt: skip
        self.step_losses: list[float] = []
        self.step_epochs: list[int] = []
        self.tuning_losses: list[float] = []
        self.tuning_accuracies: list[float] = []
        self._tuning_sums: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.step_losses.append(loss.item())
        self.step_epochs.append(self.current_epoch)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._tuning_sums = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(1) == labels).sum()
        self._tuning_sums.append(torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(len(labels))]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._tuning_sums:
            return
        loss_sum, correct, count = torch.stack(self._tuning_sums).sum(0).tolist()
        self.tuning_losses.append(loss_sum / count)
        self.tuning_accuracies.append(correct / count)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
