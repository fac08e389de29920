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


def stub_checkpoint(folder: Path) -> Path:
    path = folder / "stub.ckpt"
    path.write_bytes(b"stub checkpoint")
    return path


def stub_app(data_dir: Path, **options: Any):
    """An app with the stub adapter (no torch in its worker), its workers ready."""
    settings = ServeSettings(checkpoint=str(stub_checkpoint(data_dir.parent)), model="stub:Model",
                             data_dir=data_dir, adapter="serve_stub:StubPredictor", heatmaps=("cam",),
                             **options)  # fmt: skip
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
