"""The web service's settings and the layout of its data directory (everything it writes
lives under one folder)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataDir", "ServeSettings"]

_GIB = 2**30


def _default_memory_budget() -> int:
    """Half of the machine's memory (for the jobs, beyond the workers' own model copies)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 * _GIB


@dataclass
class ServeSettings:
    """How the web service runs.

    Args:
        checkpoint: the trained model's checkpoint (loaded with ``weights_only=True``).
        model: its class, as ``"module:Class"`` (or the class itself).
        data_dir: the one folder the service writes to: database, secret key, uploads,
            results, temporary files.
        workers: prediction processes; each holds one copy of the model.
        memory_budget: bytes the running jobs may use together (estimated per job from the
            image's size); a job waits until it fits, and one that can never fit fails.
        job_overhead: bytes one job needs besides its decoded image (tiles, heatmaps, outputs).
        max_upload_bytes: the largest upload accepted.
        max_image_pixels: the largest image (level 0) a job opens; larger ones fail.
        login_limit: failed log-ins allowed per user name and, separately, per address
            (Flask-Limiter's notation, ``"5 per minute; 30 per hour"``).
        register_limit: accounts created per address.
        job_timeout: seconds one prediction may run before its worker is stopped.
        heatmaps: heatmap kinds computed for each upload (the first is shown first).
        trusted_proxy: address of a reverse proxy whose ``X-Forwarded-Proto`` is believed
            (so cookies get ``Secure`` behind an HTTPS proxy); ``None`` trusts none.
        adapter: the prediction adapter, ``"module:Class"`` (the service's thin layer over
            the inference API; tests of the web layer swap in a stand-in).
        argon2: the password hash's ``(passes, memory in KiB, lanes)``; the default is RFC
            9106's second recommended set.
    """

    checkpoint: str
    model: str | type
    data_dir: Path = Path("serve-data")
    workers: int = 1
    memory_budget: int = field(default_factory=_default_memory_budget)
    job_overhead: int = 512 * 2**20
    max_upload_bytes: int = 1024 * 2**20
    max_image_pixels: int = 200_000_000
    login_limit: str = "5 per minute; 30 per hour"
    register_limit: str = "10 per hour"
    job_timeout: float = 3600.0
    heatmaps: tuple[str, ...] = ("cam", "saliency")
    trusted_proxy: str | None = None
    adapter: str = "lightning_streaming.serve.predictor:StreamingPredictor"
    argon2: tuple[int, int, int] = (3, 65536, 4)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not isinstance(self.model, str):  # a class: name it, for the worker processes
            self.model = f"{self.model.__module__}:{self.model.__qualname__}"
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers!r}")
        if self.memory_budget < self.job_overhead:
            raise ValueError(
                f"memory_budget ({self.memory_budget} bytes) must be at least job_overhead ({self.job_overhead} bytes)"
            )
        if self.max_upload_bytes < 1 or self.max_image_pixels < 1:
            raise ValueError("max_upload_bytes and max_image_pixels must be positive")


class DataDir:
    """Where each thing lives under the data directory; creates the folders (owner-only)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        for folder in (self.root, self.uploads, self.results, self.tmp, self.cache):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "serve.sqlite3"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def result_dir(self, prediction_id: str) -> Path:
        return self.results / prediction_id

    def secret_key(self) -> str:
        """The key that signs session cookies: made once (random), kept in the data directory
        so sessions survive a restart."""
        path = self.root / "secret_key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32))
        return path.read_text().strip()

    def environment(self) -> dict[str, str]:
        """Environment for the worker processes: temporary files and library caches (Matplotlib,
        torch) inside the data directory."""
        return {
            "TMPDIR": str(self.tmp),
            "MPLCONFIGDIR": str(self.cache / "matplotlib"),
            "XDG_CACHE_HOME": str(self.cache),
            "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "torchinductor"),
        }
