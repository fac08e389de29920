"""Load test of the web service on localhost: several users upload at once; every upload
must finish with its own correct result, none lost, with memory bounded.

Run: ``python benchmarks/serve_load.py`` (after ``make demo``, which saves the demo model as
``results/demo/model.ckpt``). It starts ``lightning-streaming serve`` on 127.0.0.1 at a free
port with a fresh data directory under ``results/serve-load/``, registers ``--users`` users,
uploads ``--per-user`` PNGs each, all at once (crops of the example slide region, each
different), waits for every result, checks each against ``ls.predict_slide`` run here on
the same file, and prints the times and the peak resident memory of the server and its
workers. Options: ``--workers``, ``--users``, ``--per-user``, ``--checkpoint``, ``--model``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "load test password"


class ServerProcess:
    """``python -m lightning_streaming serve ...`` (the ``lightning-streaming`` command) on 127.0.0.1 at a free port, as a child
    process; ``url`` once it serves. ``stop()`` sends SIGTERM (SIGKILL after ``grace`` s);
    ``kill()`` sends SIGKILL at once (a crash)."""

    def __init__(self, checkpoint: Path, model: str, data_dir: Path, *, workers: int = 1,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 300) -> None:  # fmt: skip
        command = [sys.executable, "-m", "lightning_streaming", "serve", "--checkpoint", str(checkpoint), "--model",
                   model, "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir), "--workers",
                   str(workers), *extra]  # fmt: skip
        self.log: list[str] = []
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env, cwd=cwd, stdin=subprocess.DEVNULL)  # fmt: skip
        self.url = self._wait_for_url(timeout)

    def _wait_for_url(self, timeout: float) -> str:
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"Serving on (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))
        return found[0]

    def worker_pids(self) -> list[int]:
        """The server's child processes (its prediction workers)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def stop(self, grace: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss(pid: int) -> int:
    """Peak resident memory of a live process in bytes (VmHWM), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Upload:
    user: str
    image: int
    id: str = ""
    answer: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class LoadReport:
    uploads: list[Upload]
    seconds: float  # from the first upload to the last result
    listed: dict[str, list[str]]  # each user's GET /api/predictions ids
    foreign: int  # another user's prediction answered with anything but 404

    @property
    def lost(self) -> list[Upload]:
        return [u for u in self.uploads if u.id not in self.listed.get(u.user, [])]


def run_load(url: str, images: Sequence[bytes], users: int = 5, per_user: int = 4, timeout: float = 900) -> LoadReport:
    """``users`` accounts upload ``per_user`` images each, all at the same time (image ``i`` of
    user ``u`` is ``images[(u * per_user + i) % len(images)]``); then wait for every result."""
    import requests

    sessions = {}
    for u in range(users):
        name = f"load{u}"
        session = requests.Session()
        session.post(f"{url}/api/register", json={"username": name, "password": PASSWORD}, timeout=60)
        session.post(f"{url}/api/login", json={"username": name, "password": PASSWORD}, timeout=60).raise_for_status()
        sessions[name] = session
    uploads = [Upload(name, (u * per_user + i) % len(images)) for u, name in enumerate(sessions) for i in range(per_user)]
    start = threading.Barrier(len(uploads))

    def send(upload: Upload) -> None:
        start.wait()
        begun = time.perf_counter()
        files = {"file": (f"image{upload.image}.png", images[upload.image], "image/png")}
        answer = sessions[upload.user].post(f"{url}/api/predictions", files=files, timeout=120)
        answer.raise_for_status()
        upload.id = answer.json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            upload.answer = sessions[upload.user].get(f"{url}/api/predictions/{upload.id}", timeout=60).json()
            if upload.answer["status"] in ("done", "failed"):
                break
            time.sleep(1.0)  # as the result page polls
        upload.seconds = time.perf_counter() - begun

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(uploads)) as pool:
        list(pool.map(send, uploads))
    seconds = time.perf_counter() - t0
    listed = {name: [p["id"] for p in s.get(f"{url}/api/predictions", timeout=60).json()] for name, s in sessions.items()}
    names = list(sessions)
    foreign = sum(
        sessions[names[(names.index(u.user) + 1) % len(names)]].get(f"{url}/api/predictions/{u.id}", timeout=60
                                                                    ).status_code != 404  # fmt: skip
        for u in uploads
    ) if len(names) > 1 else 0  # fmt: skip
    return LoadReport(uploads, seconds, listed, foreign)


def example_crops(slide_path: Path, spacing: float, count: int, size: int = 192) -> list[bytes]:
    """``count`` different PNG crops of a slide read at ``spacing`` (a grid over the image)."""
    import io

    from PIL import Image

    import lightning_streaming as ls

    pixels = ls.Slide(slide_path).read(spacing).permute(1, 2, 0).numpy()
    height, width = pixels.shape[:2]
    size = min(size, height, width)
    crops = []
    for i in range(count):
        y = (i * 7919) % max(1, height - size)
        x = (i * 104729) % max(1, width - size)
        buffer = io.BytesIO()
        Image.fromarray(pixels[y : y + size, x : x + size]).save(buffer, "PNG")
        crops.append(buffer.getvalue())
    return crops


def expected_probabilities(checkpoint: Path, model: str, images: Sequence[bytes], folder: Path) -> list[dict]:
    """What ``ls.predict_slide`` says of each image, run here (no heatmaps)."""
    import lightning_streaming as ls

    loaded = ls.load_model(checkpoint, model, map_location="cpu")
    folder.mkdir(parents=True, exist_ok=True)
    answers = []
    for i, data in enumerate(images):
        path = folder / f"image{i}.png"
        path.write_bytes(data)
        answers.append(ls.predict_slide(loaded, path, heatmaps=()).probabilities)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "results" / "demo" / "model.ckpt")
    parser.add_argument("--model", default="examples.slide_demo:SlideClassifier")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--per-user", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="crop size in pixels (default 512)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import shutil

    import lightning_streaming as ls

    if not args.checkpoint.is_file():
        sys.exit(f"no checkpoint at {args.checkpoint}: run `make demo` first")
    out = REPO / "results" / "serve-load"
    shutil.rmtree(out, ignore_errors=True)
    model = ls.load_model(args.checkpoint, args.model)
    spacing = ls.model_info(model).spacing or 1.0
    slides = ls.example_slides(REPO / ".data")
    count = args.users * args.per_user
    images = example_crops(slides.cmu_small_region, spacing, count, args.size)
    expected = expected_probabilities(args.checkpoint, args.model, images, out / "images")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ServerProcess(args.checkpoint, args.model, out / "data", workers=args.workers, env=env, cwd=REPO) as server:
        report = run_load(server.url, images, args.users, args.per_user)
        server_peak = peak_rss(server.process.pid)
        worker_peaks = [peak_rss(pid) for pid in server.worker_pids()]
    done = [u for u in report.uploads if u.answer.get("status") == "done"]
    right = sum(
        all(abs(u.answer["probabilities"][k] - v) < 1e-4 for k, v in expected[u.image].items()) for u in done
    )  # fmt: skip
    times = sorted(u.seconds for u in report.uploads)
    print(f"{len(report.uploads)} uploads ({args.per_user} from each of {args.users} users, {args.size}x{args.size} px "
          f"PNGs at {spacing:g} um/px), {args.workers} workers: all finished in {report.seconds:.1f} s; "
          f"{len(done)} done, {right} with the probabilities ls.predict_slide gives here, {len(report.lost)} lost, "
          f"{report.foreign} answered to another user")  # fmt: skip
    print(f"upload -> result: median {times[len(times) // 2]:.1f} s, longest {times[-1]:.1f} s")
    print(f"peak resident memory: server {server_peak / 2**20:.0f} MiB, workers "
          + ", ".join(f"{p / 2**20:.0f} MiB" for p in worker_peaks))  # fmt: skip


if __name__ == "__main__":
    main()
