"""The bounded pool of prediction workers and the dispatcher thread that feeds it.

Uploads wait in the database as ``queued``. The dispatcher starts the oldest one when a
worker is idle and its estimated memory fits in the budget beside the running jobs (first
come, first served: a large job is not overtaken forever by small ones). Workers are
separate processes, so a file that crashes an image library, or a job that runs too long,
costs that job and a restarted worker, never the server. At start-up, jobs that a stopped
server left ``running`` are queued again (once) or failed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from flask import Flask
from sqlalchemy import select

from .budget import MemoryBudget, job_bytes
from .database import Prediction, db, utcnow
from .image_probe import ImageFacts, InspectionError, inspect_file
from .settings import DataDir, ServeSettings
from .worker import DuplexPipe

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

_TICK = 0.2  # seconds the dispatcher waits for a message before looking at the queue again
_MAX_ATTEMPTS = 2  # a job interrupted by restarts this often is failed, not queued again


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: DuplexPipe
    ready: bool = False
    job: str | None = None
    reserved: int = 0
    started: float = 0.0


@dataclass
class PoolState:
    """What the pool tells the pages and /healthz."""

    ready: bool = False
    error: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    running_peak: int = 0


class WorkerPool:
    """Worker processes and their dispatcher, for one Flask app.

    Args:
        app: the app (its database holds the queue).
        settings: the service's settings.
        data: its data directory.
    """

    def __init__(self, app: Flask, settings: ServeSettings, data: DataDir) -> None:
        self.app = app
        self.settings = settings
        self.data = data
        self.state = PoolState()
        self.budget = MemoryBudget(settings.memory_budget)
        self._workers: list[_Worker] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._env = {**os.environ, **data.environment()}
        self._load_failures = 0

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Recover jobs a previous run left running, start the workers and the dispatcher."""
        with self.app.app_context():
            self._recover()
        for _ in range(self.settings.workers):
            self._spawn()
        self._thread = threading.Thread(target=self._loop, name="prediction-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the dispatcher and the workers (a running job stays ``running`` in the
        database and is queued again at the next start)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(5)
            worker.conn.close()
        self._workers.clear()

    def notify(self) -> None:
        """A job was queued: look at the queue now."""
        self._wake.set()

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def wait_ready(self, timeout: float) -> bool:
        """Wait until a worker has loaded the model (True) or loading failed / time ran out (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.state.ready and self.state.error is None:
            time.sleep(0.05)
        return self.state.ready

    # -- the dispatcher --------------------------------------------------------------------

    def _spawn(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        config = {
            "read_fd": to_child_r, "write_fd": from_child_w, "adapter": self.settings.adapter,
            "checkpoint": self.settings.checkpoint, "model": self.settings.model,
            "heatmaps": list(self.settings.heatmaps), "sys_path": sys.path,
            "threads": max(1, (os.cpu_count() or 1) // self.settings.workers),
        }  # fmt: skip
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "lightning_streaming.serve.worker", json.dumps(config)],
                pass_fds=(to_child_r, from_child_w), env=self._env, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._workers.append(_Worker(process, DuplexPipe(from_child_r, to_child_w)))

    def _loop(self) -> None:
        with self.app.app_context():
            while not self._stopping.is_set():
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - the dispatcher must outlive any one bad event
                    log.exception("dispatcher step failed")
                    db.session.rollback()
                    time.sleep(_TICK)

    def _step(self) -> None:
        readers = {w.conn.reader: w for w in self._workers}
        if not readers:  # every worker failed to load the model: nothing to wait for
            time.sleep(_TICK)
        for ready in wait(list(readers), timeout=_TICK):
            if readers[ready] in self._workers:
                self._receive(readers[ready])
        self._enforce_timeouts()
        if self._wake.is_set() or any(w.ready and w.job is None for w in self._workers):
            self._wake.clear()
            self._admit()
        self._inspect_ahead()

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the process has ended (or is ending)
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(5)
            self._died(worker)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self.state.model = message[1]
            self.state.ready = True
            self._load_failures = 0
        elif kind == "load_error":
            self.state.error = message[1]
            self._load_failures += 1
            log.error("%s", message[1])
        elif kind == "progress":
            prediction = db.session.get(Prediction, message[1])
            if prediction is not None and prediction.status == "running":
                prediction.progress = message[2]
                db.session.commit()
        elif kind in ("done", "failed"):
            self._finish(worker, message[1], message[2] if kind == "done" else None,
                         message[2] if kind == "failed" else None)  # fmt: skip

    def _finish(self, worker: _Worker, job_id: str, result: dict[str, Any] | None, error: str | None) -> None:
        prediction = db.session.get(Prediction, job_id)
        if prediction is not None:
            prediction.finished = utcnow()
            if result is not None:
                prediction.status = "done"
                prediction.progress = 1.0
                prediction.label = result.get("label")
                prediction.probabilities = result.get("probabilities")
                prediction.value = result.get("value")
                prediction.files = result.get("files")
                prediction.layers = result.get("layers")
                log.info("prediction %s done: %s", job_id, prediction.label)
            else:
                prediction.status = "failed"
                prediction.error = error
                log.info("prediction %s failed: %s", job_id, error)
            db.session.commit()
        self.budget.release(worker.reserved)
        worker.job, worker.reserved = None, 0

    def _died(self, worker: _Worker, reason: str | None = None) -> None:
        code = worker.process.returncode
        self._workers.remove(worker)
        worker.conn.close()
        if worker.job is not None:
            self._finish(worker, worker.job, None, reason or (
                f"The prediction process stopped unexpectedly (exit code {code}) while working on this file. The "
                "file may be damaged, or too large for this server's memory."))  # fmt: skip
        if self._stopping.is_set():
            return
        if not worker.ready and self._load_failures:
            log.error("a worker could not load the model; not restarting it")
            return
        log.warning("worker %s stopped (exit code %s); starting another", worker.process.pid, code)
        self._spawn()

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now - worker.started > self.settings.job_timeout:
                worker.process.kill()
                worker.process.wait(5)
                self._died(worker, f"The prediction took longer than {self.settings.job_timeout:g} s and was stopped.")

    def _admit(self) -> None:
        while True:
            idle = next((w for w in self._workers if w.ready and w.job is None), None)
            if idle is None:
                return
            prediction = db.session.scalar(
                select(Prediction).where(Prediction.status == "queued").order_by(Prediction.created).limit(1)
            )
            if prediction is None:
                return
            need = self._estimate(prediction)
            if need is None:
                continue  # failed at inspection; look at the next one
            if not self.budget.fits(need):
                return  # wait for running jobs to finish (first come, first served)
            self._assign(idle, prediction, need)

    def _inspect_ahead(self) -> None:
        """Open the oldest queued file not yet inspected while the workers are busy, so a worker
        that comes free starts its next job at once (one file per tick)."""
        prediction = db.session.scalar(
            select(Prediction).where(Prediction.status == "queued", Prediction.image.is_(None))
            .order_by(Prediction.created).limit(1)
        )  # fmt: skip
        if prediction is not None:
            self._estimate(prediction)

    def _estimate(self, prediction: Prediction) -> int | None:
        """The job's memory need, inspecting the file first if not yet done; None (and the
        job failed) when it cannot be opened or can never fit."""
        path = self.data.uploads / prediction.stored_name
        if prediction.image is None:
            try:
                facts = inspect_file(path, prediction.filename, env=self._env)
            except InspectionError as error:
                return self._refuse(prediction, str(error))
            prediction.image = facts.__dict__
            db.session.commit()
        facts = ImageFacts(**prediction.image)
        if facts.whole and facts.pixels > self.settings.max_image_pixels:
            return self._refuse(prediction, (
                f"{prediction.filename} is {facts.width} x {facts.height} pixels; this server opens ordinary images "
                f"up to {self.settings.max_image_pixels:,} pixels. Convert it to a tiled pyramidal TIFF (read region "
                "by region) or send a smaller image."))  # fmt: skip
        need = job_bytes(facts, self.settings.job_overhead)
        if not self.budget.can_ever_fit(need):
            return self._refuse(prediction, (
                f"{prediction.filename} needs about {need / 2**30:.1f} GiB of memory to predict; this server's budget "
                f"is {self.budget.total / 2**30:.1f} GiB. Convert it to a tiled pyramidal TIFF or send a smaller "
                "image."))  # fmt: skip
        return need

    def _refuse(self, prediction: Prediction, message: str) -> None:
        """Fail a job before it runs."""
        prediction.status, prediction.error, prediction.finished = "failed", message, utcnow()
        db.session.commit()
        log.info("prediction %s refused: %s", prediction.id, message)
        return None

    def _assign(self, worker: _Worker, prediction: Prediction, need: int) -> None:
        self.budget.reserve(need)
        prediction.status, prediction.started, prediction.progress = "running", utcnow(), 0.0
        prediction.attempts += 1
        db.session.commit()
        worker.job, worker.reserved, worker.started = prediction.id, need, time.monotonic()
        running = sum(w.job is not None for w in self._workers)
        self.state.running_peak = max(self.state.running_peak, running)
        worker.conn.send({
            "id": prediction.id, "path": str(self.data.uploads / prediction.stored_name),
            "out_dir": str(self.data.result_dir(prediction.id)), "base_spacing": prediction.base_spacing,
            "shown_name": prediction.filename, "data_dir": str(self.data.root),
        })  # fmt: skip
        log.info("prediction %s started (%s, about %.0f MiB)", prediction.id, prediction.filename, need / 2**20)

    # -- start-up ------------------------------------------------------------------------

    def _recover(self) -> None:
        """Jobs left ``running`` by a server that stopped: queue them again, or fail them
        after ``_MAX_ATTEMPTS`` tries."""
        stale = db.session.scalars(select(Prediction).where(Prediction.status == "running")).all()
        for prediction in stale:
            if prediction.attempts >= _MAX_ATTEMPTS:
                prediction.status, prediction.finished = "failed", utcnow()
                prediction.error = (f"The server restarted {prediction.attempts} times while predicting this file; "
                                    "it was not tried again. Upload it again to retry.")  # fmt: skip
            else:
                prediction.status, prediction.progress, prediction.started = "queued", 0.0, None
            log.info("prediction %s was interrupted by a restart: %s", prediction.id, prediction.status)
        db.session.commit()
