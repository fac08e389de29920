"""The web service against the real inference API and a real (tiny) model: results equal
``ls.predict_slide``'s, every download, a damaged file; the command-line server killed
mid-job and restarted (nothing lost, nothing written outside its data directory); and the
load test: 20 uploads from 5 users at once."""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
import pytest
import requests
from serve_helpers import (
    PASSWORD, REAL_MODEL, REPO, account, real_app, real_checkpoint, server_env, upload, wait_done,
)  # fmt: skip

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_load  # noqa: E402

import lightning_streaming as ls  # noqa: E402

pytestmark = pytest.mark.slow


def test_results_are_the_inference_apis_with_every_download(tmp_path, example_slides):
    app, classes = real_app(tmp_path / "data")
    try:
        image = tmp_path / "region.png"
        image.write_bytes(serve_load.example_crops(example_slides.cmu_small_region, 2.0, 1, size=256)[0])
        c = account(app, "reader")
        answer = wait_done(c, upload(c, image.read_bytes(), "region.png"), timeout=300)
        assert answer["status"] == "done", answer
        model = ls.load_model(tmp_path / "tiny.ckpt", REAL_MODEL)
        expected = ls.predict_slide(model, image, heatmaps=())
        assert answer["label"] == expected.label and set(answer["probabilities"]) == set(classes)
        assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert set(answer["heatmaps"]) == {"cam", "saliency"}
        pid = answer["id"]
        for kind in ("cam", "saliency"):
            png = c.get(f"/api/predictions/{pid}/heatmap.png?kind={kind}")
            assert png.status_code == 200 and png.data.startswith(b"\x89PNG")
        files = answer["files"]
        assert any(f.endswith(".csv") for f in files) and any(f.endswith(".json") for f in files)
        heatmaps = [f for f in files if f.endswith(".npy")]
        assert heatmaps and all(np.load(io.BytesIO(c.get(f"/api/predictions/{pid}/files/{f}").data)).ndim == 2
                                for f in heatmaps)  # fmt: skip
        written = json.loads(c.get(f"/api/predictions/{pid}/files/{next(f for f in files if f.endswith('.json'))}").data)
        assert answer["label"] in json.dumps(written)
        page = c.get(f"/predictions/{pid}").get_data(as_text=True)
        assert answer["label"] in page and all(name in page for name in classes)

        damaged = wait_done(c, upload(c, image.read_bytes()[:4000], "damaged.png"), timeout=120)
        assert damaged["status"] == "failed" and "damaged.png" in damaged["error"], damaged
        assert str(tmp_path) not in damaged["error"]
        again = wait_done(c, upload(c, image.read_bytes(), "again.png"), timeout=300)
        assert again["status"] == "done" and again["label"] == answer["label"]
    finally:
        app.extensions["lightning_streaming"].pool.stop()


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _isolated_env(root):
    """HOME, the temporary folder and the caches pointed at empty folders we can inspect."""
    env = {k: v for k, v in server_env().items() if not k.startswith("XDG_")}
    folders = {name: root / name for name in ("home", "tmp", "cwd")}
    for folder in folders.values():
        folder.mkdir()
    env.update(HOME=str(folders["home"]), TMPDIR=str(folders["tmp"]), PYTHONDONTWRITEBYTECODE="1")
    return env, folders


def test_the_server_killed_mid_job_restarts_with_nothing_lost_and_writes_only_its_data_dir(tmp_path, example_slides):
    checkpoint = real_checkpoint(tmp_path)
    env, folders = _isolated_env(tmp_path)
    data = tmp_path / "data"
    crops = serve_load.example_crops(example_slides.cmu_small_region, 2.0, 4, size=256)
    with serve_load.ServerProcess(checkpoint, REAL_MODEL, data, env=env, cwd=folders["cwd"]) as server:
        session = requests.Session()
        assert session.post(f"{server.url}/api/register", json={"username": "survivor", "password": PASSWORD}
                            ).status_code == 201  # fmt: skip
        assert session.post(f"{server.url}/api/login", json={"username": "survivor", "password": PASSWORD}).ok
        ids = [session.post(f"{server.url}/api/predictions", files={"file": (f"crop{i}.png", crop)}).json()["id"]
               for i, crop in enumerate(crops)]  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if session.get(f"{server.url}/api/predictions/{ids[0]}").json()["status"] != "queued":
                break
            time.sleep(0.05)
        workers = server.worker_pids()
        server.kill()  # SIGKILL: no clean shutdown
        deadline = time.monotonic() + 30
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers and not any(map(_alive, workers))  # they die with the server
    with serve_load.ServerProcess(checkpoint, REAL_MODEL, data, env=env, cwd=folders["cwd"]) as server:
        again = requests.Session()
        again.cookies.update(session.cookies)  # the old session still works
        answers = []
        for pid in ids:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                answer = again.get(f"{server.url}/api/predictions/{pid}").json()
                if answer["status"] in ("done", "failed"):
                    break
                time.sleep(0.2)
            answers.append(answer)
        assert [a["status"] for a in answers] == ["done"] * len(ids), answers
        assert [p["id"] for p in again.get(f"{server.url}/api/predictions").json()] == ids[::-1]
        assert requests.post(f"{server.url}/api/login", json={"username": "survivor", "password": PASSWORD}).ok
        assert server.stop() == 0, "".join(server.log[-40:])
    for name, folder in folders.items():
        assert list(folder.rglob("*")) == [], f"the server wrote into {name}: {list(folder.rglob('*'))}"
    assert {p.name for p in data.iterdir()} >= {"serve.sqlite3", "secret_key", "uploads", "results"}


def test_load_20_uploads_from_5_users_at_once(tmp_path, example_slides, record_property):
    checkpoint = real_checkpoint(tmp_path)
    images = serve_load.example_crops(example_slides.cmu_small_region, 2.0, 20, size=128)
    expected = serve_load.expected_probabilities(checkpoint, REAL_MODEL, images, tmp_path / "images")
    with serve_load.ServerProcess(checkpoint, REAL_MODEL, tmp_path / "data", workers=2, env=server_env(),
                                  cwd=REPO) as server:  # fmt: skip
        report = serve_load.run_load(server.url, images, users=5, per_user=4)
        workers = server.worker_pids()
        peaks = [serve_load.peak_rss(pid) for pid in [server.process.pid, *workers]]
    assert len(report.uploads) == 20 and len({u.id for u in report.uploads}) == 20
    assert [u.answer["status"] for u in report.uploads] == ["done"] * 20
    for u in report.uploads:  # each its own result: the probabilities of its own image
        assert u.answer["probabilities"] == pytest.approx(expected[u.image], abs=1e-5), u
    assert report.lost == [] and report.foreign == 0
    assert all(len(ids) == 4 for ids in report.listed.values())
    # Memory bounded: two workers (never more processes), each well under 2 GiB, the server under 1 GiB.
    assert len(workers) == 2 and peaks[0] < 2**30 and all(0 < p < 2 * 2**30 for p in peaks[1:]), peaks
    record_property("load_seconds", round(report.seconds, 1))
    record_property("peak_rss_mib", [round(p / 2**20) for p in peaks])
    print(f"load: 20 uploads from 5 users finished in {report.seconds:.1f} s; peak RSS server/workers "
          f"{[round(p / 2**20) for p in peaks]} MiB")  # fmt: skip


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    import subprocess

    import torch

    marker = tmp_path / "the checkpoint ran code"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload()}, checkpoint)
    served = subprocess.run(
        [sys.executable, "-m", "lightning_streaming", "serve", "--checkpoint", str(checkpoint), "--model", REAL_MODEL,
         "--port", "0", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300, env=server_env(), cwd=REPO,
    )  # fmt: skip
    assert served.returncode == 2 and "could not load the model" in served.stderr, served.stderr[-3000:]
    assert "weights_only" in served.stderr and not marker.exists()
