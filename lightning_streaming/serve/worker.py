"""A prediction worker process: loads the model once through the adapter, then runs the jobs
the dispatcher sends it, one at a time, reporting progress, results and failures over its
pipes. An exception in a job fails that job, never the worker.

Started by the pool as ``python -m lightning_streaming.serve.worker CONFIG_JSON`` with two
inherited pipe descriptors (a fresh interpreter that imports nothing of the server's main
module, unlike multiprocessing's spawn); messages are ``multiprocessing.connection``
messages between the server and its own child.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

__all__ = ["worker_main", "load_adapter", "user_message", "DuplexPipe"]

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 0.25  # seconds between progress messages


def load_adapter(spec: str) -> Callable[..., Any]:
    """The adapter class named ``"module:Class"``."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def user_message(error: BaseException, replacements: dict[str, str]) -> str:
    """What the owner of a failed job is told: the error's own words for errors about the
    input (the library's messages say what is wrong and what to do), a plain sentence for
    anything else. Server paths are replaced by the file's own name."""
    from lightning_streaming.data.errors import SlideError

    if isinstance(error, (SlideError, ValueError, MemoryError)):
        text = str(error) or type(error).__name__
    else:
        text = f"The prediction stopped with an internal error ({type(error).__name__}); the server's log has the details."
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


class DuplexPipe:
    """Two one-way pipes as one connection: ``recv`` reads one, ``send`` writes the other."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = Connection(read_fd, writable=False)
        self.writer = Connection(write_fd, readable=False)

    def send(self, message: Any) -> None:
        self.writer.send(message)

    def recv(self) -> Any:
        return self.reader.recv()

    def fileno(self) -> int:
        return self.reader.fileno()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def worker_main(conn: Any, adapter: str, checkpoint: str, model: Any, heatmaps: tuple[str, ...],
                threads: int) -> None:  # fmt: skip
    """The worker's life: load, say ready (with the model's description), then serve jobs
    until it receives ``None`` or its pipe closes. ``threads``: intra-op threads for torch."""
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads))  # read by torch when the adapter imports it
    try:
        predictor = load_adapter(adapter)(checkpoint, model, heatmaps=heatmaps)
        info = predictor.info()
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, threads))
    except Exception as error:  # noqa: BLE001 - reported to the server, which says it on /healthz
        log.exception("could not load the model")
        conn.send(("load_error", f"could not load the model from {checkpoint}: {type(error).__name__}: {error}"))
        return
    conn.send(("ready", info))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if job is None:
            return
        _run(conn, predictor, job)


def _run(conn: Connection, predictor: Any, job: dict[str, Any]) -> None:
    job_id = job["id"]
    last = [0.0]
    lock = threading.Lock()  # the inference code may report progress from another thread

    def progress(fraction: float) -> None:
        now = time.monotonic()
        with lock:
            if now - last[0] >= _PROGRESS_INTERVAL:
                last[0] = now
                conn.send(("progress", job_id, float(min(max(fraction, 0.0), 1.0))))

    try:
        out_dir = Path(job["out_dir"])
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        result = predictor.predict(Path(job["path"]), out_dir, name=job["shown_name"], base_spacing=job["base_spacing"],
                                   progress=progress)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - any failure of one job is that job's failure
        log.warning("job %s failed", job_id, exc_info=True)
        conn.send(("failed", job_id, user_message(error, {job["path"]: job["shown_name"], job["data_dir"]: "…"})))
        return
    conn.send(("done", job_id, result))


def _die_with_parent() -> None:
    """On Linux, end this process when the server that started it dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


if __name__ == "__main__":
    _die_with_parent()
    config = json.loads(sys.argv[1])
    sys.path[:] = config["sys_path"]  # as the server sees modules (the model's class may live beside it)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker %(process)d: %(message)s")
    worker_main(DuplexPipe(config["read_fd"], config["write_fd"]), config["adapter"], config["checkpoint"],
                config["model"], tuple(config["heatmaps"]), config["threads"])  # fmt: skip
