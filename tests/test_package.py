"""The package as a user meets it: what importing it costs, its public names, its commands."""

from __future__ import annotations

import subprocess
import sys

import lightning_streaming as ls

HEAVY = ("lightning", "pytorch_lightning", "lightning_fabric", "openslide")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_and_plain_pytorch_streaming_import_neither_lightning_nor_openslide():
    code = f"""
import sys
import lightning_streaming as ls
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, ("import", loaded)
import torch
trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
image = torch.randint(0, 256, (1, 3, 40, 36), dtype=torch.uint8)
out = ls.stream(trunk, image, 16, transform=ls.Uint8Normalize([0.5] * 3, [0.2] * 3))
ls.Manifest, ls.TissueDetection(), ls.StreamingMixin, ls.split_at, ls.TileTooSmallError
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert out.shape == (1, 4, 20, 18) and not loaded, ("stream", loaded)
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_every_public_name_resolves():
    missing = [name for name in ls.__all__ if getattr(ls, name, None) is None]
    assert not missing and set(ls.__all__) <= set(dir(ls))
    assert isinstance(ls.StreamingStrategy(tile_size=8), ls.StreamingStrategy)


def test_the_stats_command_runs_without_a_runpy_warning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "lightning_streaming.data.stats", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "--spacing" in result.stdout and not result.stderr, result.stderr


def test_without_lightning_the_lightning_classes_say_how_to_install_it():
    code = """
import sys
sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # neither installed
import lightning_streaming as ls
ls.StreamingMixin  # the mixin needs no Lightning
try:
    ls.StreamingStrategy
except ModuleNotFoundError as error:
    print(error)
"""
    result = run_python(code)
    assert result.returncode == 0 and "needs PyTorch Lightning: pip install lightning" in result.stdout, result.stderr


def test_predicting_with_a_plain_pytorch_model_imports_no_lightning(tmp_path):
    code = f"""
import sys
import numpy as np
import torch
from PIL import Image
import lightning_streaming as ls

class Net(ls.StreamingMixin, torch.nn.Module):  # no Lightning at all
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        self.tile_transform = ls.Uint8Normalize([0.5] * 3, [0.2] * 3)

pixels = np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)
Image.fromarray(pixels).save({str(tmp_path)!r} + "/a.png")
torch.save(Net().state_dict(), {str(tmp_path)!r} + "/net.pt")
model = ls.load_model({str(tmp_path)!r} + "/net.pt", Net)
model.model_info = ls.ModelInfo(classes=["x", "y"], spacing=1.0)
prediction = ls.predict_slide(model, {str(tmp_path)!r} + "/a.png", heatmaps=("saliency", "cam"), tissue=None)
ls.write_prediction(prediction, {str(tmp_path)!r} + "/out")
loaded = [m for m in ("lightning", "pytorch_lightning", "lightning_fabric") if m in sys.modules]
assert not loaded, loaded
print(prediction.label)
"""
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() in ("x", "y"), result.stderr[-3000:]
