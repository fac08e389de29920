"""Helpers for the web service's tests: apps on a temporary data directory (with the stub
adapter, or the real one), images as upload bytes, accounts, and waiting for jobs."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_streaming.serve import ServeSettings, create_app

TESTS = Path(__file__).resolve().parent
PASSWORD = "a long enough password"
CHEAP_ARGON2 = (1, 8192, 1)  # the web-layer tests hash many passwords; the default is tested once


def stub_checkpoint(folder: Path) -> Path:
    path = folder / "stub.ckpt"
    path.write_bytes(b"stub checkpoint")
    return path


def stub_app(data_dir: Path, **options: Any):
    """An app with the stub adapter (no torch in its worker), its workers ready."""
    settings = ServeSettings(checkpoint=str(stub_checkpoint(data_dir.parent)), model="stub:Model",
                             data_dir=data_dir, adapter="serve_stub:StubPredictor", heatmaps=("cam",),
                             **{"argon2": CHEAP_ARGON2, **options})  # fmt: skip
    app = create_app(settings)
    assert app.extensions["lightning_streaming"].pool.wait_ready(60), app.extensions["lightning_streaming"].pool.state
    return app


def png_bytes(pixels: np.ndarray | None = None, value: int = 60, size: tuple[int, int] = (40, 50)) -> bytes:
    if pixels is None:
        pixels = np.full((*size, 3), value, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def client(app, address: str = "127.0.0.1", **options: Any):
    test_client = app.test_client(**options)
    test_client.environ_base["REMOTE_ADDR"] = address
    return test_client


def account(app, username: str, address: str = "127.0.0.1"):
    """A client logged in as a new user ``username``."""
    c = client(app, address)
    assert c.post("/api/register", json={"username": username, "password": PASSWORD}).status_code == 201
    assert c.post("/api/login", json={"username": username, "password": PASSWORD}).status_code == 200
    return c


def upload(c, data: bytes, name: str = "image.png", **fields: str) -> str:
    response = c.post("/api/predictions", data={"file": (io.BytesIO(data), name), **fields})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def wait_done(c, prediction_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = c.get(f"/api/predictions/{prediction_id}").get_json()
        if answer["status"] in ("done", "failed"):
            return answer
        time.sleep(0.1)
    raise AssertionError(f"prediction {prediction_id} not finished after {timeout} s: {answer}")


def csrf_token(c, path: str) -> str:
    page = c.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert match, page[:2000]
    return match.group(1)


def form_login(c, username: str, password: str = PASSWORD):
    return c.post("/login", data={"username": username, "password": password, "csrf_token": csrf_token(c, "/login")})


class LiveServer:
    """``app`` served by waitress on 127.0.0.1 at a free port, in a thread; stops on exit."""

    def __init__(self, app) -> None:
        from waitress.server import create_server

        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=0, threads=8)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self._thread = None

    def __enter__(self) -> "LiveServer":
        import threading

        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self._thread.join(10)
        self.app.extensions["lightning_streaming"].pool.stop()


REPO = TESTS.parent
REAL_MODEL = "serve_model:TinyClassifier"  # tests/serve_model.py: plain PyTorch, quick to import
REAL_CLASSES = ("benign", "tumour")
REAL_SPACING = 2.0  # um/px of the tiny real model: the example region is 554 x 740 px there


def real_checkpoint(folder: Path) -> Path:
    """The tests' streaming classifier (seeded, untrained: small and deterministic), saved as
    a checkpoint of plain data with its inference record (classes, spacing, normalisation)."""
    import torch

    import lightning_streaming as ls
    from serve_model import TinyClassifier

    mean, std = [0.80, 0.62, 0.76], [0.12, 0.18, 0.12]
    model = TinyClassifier(mean, std)
    info = ls.ModelInfo(classes=list(REAL_CLASSES), task="classification", spacing=REAL_SPACING, mean=mean, std=std,
                        model_class=REAL_MODEL)  # fmt: skip
    path = folder / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"mean": mean, "std": std},
                "lightning_streaming": info.to_dict()}, path)  # fmt: skip
    return path


def server_env(**extra: str) -> dict[str, str]:
    """Environment for a server started as a command: the tests' model importable."""
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), **extra}


def real_app(data_dir: Path, **options: Any):
    """An app with the real adapter over the inference API and the tiny real model; returns
    ``(app, class names)`` once its workers are ready."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    settings = ServeSettings(checkpoint=str(real_checkpoint(data_dir.parent)), model=REAL_MODEL, data_dir=data_dir,
                             **options)  # fmt: skip
    app = create_app(settings)
    pool = app.extensions["lightning_streaming"].pool
    assert pool.wait_ready(180), pool.state
    return app, list(pool.state.model["classes"])


def region_png(slide_path: Path, app, out: Path) -> Path:
    """The example slide region read at the model's spacing, saved as a PNG (which records no
    pixel size: the service assumes the model's)."""
    import lightning_streaming as ls

    spacing = app.extensions["lightning_streaming"].pool.state.model["spacing"]
    pixels = ls.Slide(slide_path).read(spacing)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out)
    return out
