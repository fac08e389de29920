"""Both Lightning packages: ``lightning`` (``import lightning as L``) and ``pytorch_lightning``.

Each runs in its own interpreter with the other blocked (lightning_package_worker.py): a
model on that package's LightningModule trains under ``Trainer(strategy="streaming")`` and
under an instance of our strategy with its trunk seeing tiles, StreamingLSUV runs and shows
its table, the DDP names resolve, and a SlideDataModule run's checkpoint loads with PyTorch's
defaults, rebuilds the model and the DataModule, and resumes, and the model it saved predicts
through PredictionWriter; under ``lightning`` two gloo
processes also train through Lightning's spawn launcher. A third interpreter imports both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("lightning_package_worker.py")
CHECKS = {
    "lightning": ["train_by_name", "train_instance", "ddp_names", "lsuv", "checkpoints", "predict", "ddp_spawn"],
    "pytorch_lightning": ["train_by_name", "train_instance", "ddp_names", "lsuv", "checkpoints", "predict"],
    "both": ["both"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CHECKS))
def test_each_lightning_package_in_its_own_interpreter(mode, example_slides, tmp_path):
    slides = json.dumps({"cmu_small_region": str(example_slides.cmu_small_region)})
    result = subprocess.run(
        [sys.executable, str(WORKER), mode, slides, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    passed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    output = f"{passed}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0 and passed == CHECKS[mode], output
    if mode != "both":
        # Shown without any logging set up, the way Lightning shows its model summary.
        assert "StreamingLSUV: per-channel std 1 in 2 layers" in result.stderr
