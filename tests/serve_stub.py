"""A stand-in for the service's prediction adapter, for the tests of the web layer: no
torch, so its worker starts in a fraction of a second. It opens the file with the package's
own reader (a corrupt file fails as it would for real), predicts from the image's mean
brightness (dark -> "tumour"), and writes the same kinds of files as the real adapter.
A file named ``crash...`` kills its worker, as a crashing image library would."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np


class StubPredictor:
    def __init__(self, checkpoint: str, model: Any, heatmaps: Iterable[str] = ("cam",)) -> None:
        if Path(checkpoint).read_bytes()[:4] != b"stub":
            raise ValueError(f"{checkpoint} is not a stub checkpoint")
        self.heatmaps = tuple(heatmaps)
        self.delay = float(os.environ.get("STUB_DELAY", "0"))

    def info(self) -> dict[str, Any]:
        return {"classes": ["benign", "tumour"], "task": "classification", "spacing": 2.0,
                "checkpoint": "stub.ckpt", "heatmaps": list(self.heatmaps)}  # fmt: skip

    def predict(self, path: Path, out_dir: Path, *, name: str, base_spacing: float | None,
                progress: Callable[[float], None]) -> dict[str, Any]:  # fmt: skip
        from PIL import Image

        from lightning_streaming.data.errors import SlideReadError
        from lightning_streaming.data.image_file import open_image, read_errors

        handle = open_image(path)
        width, height = handle.level_dimensions[0]
        for step in range(5):
            progress(step / 5)
            time.sleep(self.delay / 5)
        try:  # as the package's Slide reports a damaged file
            pixels = np.asarray(handle.read_region((0, 0), 0, (width, height)).convert("RGB"), dtype=np.float64)
        except read_errors(handle) as error:
            raise SlideReadError(f"cannot decode {path}: {error}", path) from error
        if width == 13 and height == 13:
            os._exit(3)  # a worker that dies, as a crashing decoder would
        dark = float(1 - pixels.mean() / 255)
        probabilities = {"benign": 1 - dark, "tumour": dark}
        label = max(probabilities, key=probabilities.get)
        heat = 1 - pixels.mean(axis=2) / 255
        np.save(out_dir / "heatmap_cam.npy", heat)
        (out_dir / "prediction.json").write_text(json.dumps({"label": label, "probabilities": probabilities}))
        (out_dir / "prediction.csv").write_text(f"label,benign,tumour\n{label},{1 - dark},{dark}\n")
        base = Image.fromarray(pixels.astype(np.uint8))
        color = Image.fromarray((np.stack([heat, np.zeros_like(heat), 1 - heat], axis=2) * 255).astype(np.uint8))
        names = {"base": "layer_cam_base.png", "color": "layer_cam_color.png", "overlay": "overlay_cam.png"}
        base.save(out_dir / names["base"])
        color.save(out_dir / names["color"])
        Image.blend(base, color, 0.5).save(out_dir / names["overlay"])
        files = {f: f for f in ("heatmap_cam.npy", "prediction.json", "prediction.csv", names["overlay"])}
        return {"label": label, "probabilities": probabilities, "value": None, "files": files,
                "layers": {"heatmaps": {"cam": names}}}  # fmt: skip
