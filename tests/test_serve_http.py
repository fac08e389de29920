"""The web service over HTTP (Flask's test client), with the stub adapter: every endpoint,
each security property, the worker pool's failures and a restart."""

from __future__ import annotations

import io
import logging
import sqlite3

import numpy as np
import pytest
from serve_helpers import (
    PASSWORD, account, client, csrf_token, form_login, png_bytes, stub_app, upload, wait_done,
)  # fmt: skip

UPLOAD_LIMIT = 2 * 2**20


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = stub_app(tmp_path_factory.mktemp("serve") / "data", login_limit="3 per minute",
                   max_upload_bytes=UPLOAD_LIMIT)  # fmt: skip
    yield app
    app.extensions["lightning_streaming"].pool.stop()


@pytest.fixture
def data(app):
    return app.extensions["lightning_streaming"].data


def test_healthz_and_home_page_describe_the_model(app):
    answer = client(app).get("/healthz")
    assert answer.status_code == 200 and answer.get_json()["status"] == "ready"
    assert answer.get_json()["model"]["classes"] == ["benign", "tumour"]
    page = client(app).get("/").get_data(as_text=True)
    for fact in ("benign", "tumour", "2 µm per pixel", "stub.ckpt"):
        assert fact in page


def test_register_rules(app):
    c = client(app, "192.0.2.10")
    assert c.post("/api/register", json={"username": "rules", "password": PASSWORD}).status_code == 201
    taken = c.post("/api/register", json={"username": "RULES", "password": PASSWORD})
    assert taken.status_code == 409 and taken.get_json()["field"] == "username"
    assert c.post("/api/register", json={"username": "x", "password": PASSWORD}).status_code == 400
    assert c.post("/api/register", json={"username": "bad name!", "password": PASSWORD}).status_code == 400
    assert c.post("/api/register", json={"username": "shortpw", "password": "short"}).status_code == 400
    assert c.post("/api/register", data={"username": "form", "password": PASSWORD}).status_code == 400  # not JSON


def test_session_cookie_is_httponly_samesite_and_secure_over_https(app):
    account(app, "cookies")
    plain = client(app).post("/api/login", json={"username": "cookies", "password": PASSWORD})
    cookie = plain.headers["Set-Cookie"]
    assert plain.status_code == 200 and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    secure = client(app).post("/api/login", json={"username": "cookies", "password": PASSWORD},
                              base_url="https://localhost")  # fmt: skip
    assert "Secure" in secure.headers["Set-Cookie"] and "HttpOnly" in secure.headers["Set-Cookie"]
    assert "Strict-Transport-Security" in secure.headers


def test_passwords_are_hashed_with_argon2id_at_rfc_9106_strength_by_default():
    from lightning_streaming.serve import ServeSettings
    from lightning_streaming.serve.passwords import Passwords

    hashed = Passwords(*ServeSettings(checkpoint="c", model="m:M").argon2).hash("correct horse battery")
    assert hashed.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    with pytest.raises(ValueError, match="too weak"):
        Passwords(1, 1024, 1)


def test_password_is_stored_as_an_argon2_hash_and_never_logged(app, data, caplog):
    secret = "my very secret password 42"
    with caplog.at_level(logging.DEBUG):
        c = client(app, "192.0.2.11")
        assert c.post("/api/register", json={"username": "hashed", "password": secret}).status_code == 201
        assert c.post("/api/login", json={"username": "hashed", "password": secret}).status_code == 200
        assert c.post("/api/login", json={"username": "hashed", "password": secret + "x"}).status_code == 401
    with sqlite3.connect(data.database) as connection:
        (stored,) = connection.execute("SELECT password_hash FROM users WHERE username = 'hashed'").fetchone()
    assert stored.startswith("$argon2id$") and secret not in stored
    raw = b"".join(path.read_bytes() for path in data.root.glob("serve.sqlite3*"))
    assert secret.encode() not in raw
    assert secret not in caplog.text and "hashed" in caplog.text  # logging was on, and said something


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/api/predictions"), ("post", "/api/predictions"), ("get", "/api/predictions/0123"),
    ("get", "/api/predictions/0123/heatmap.png"), ("get", "/api/predictions/0123/files/prediction.json"),
    ("post", "/api/logout"),
])  # fmt: skip
def test_api_without_a_session_is_401(app, method, path):
    answer = getattr(client(app), method)(path)
    assert answer.status_code == 401 and answer.is_json and "error" in answer.get_json()


@pytest.mark.parametrize("path", ["/upload", "/history", "/predictions/0123"])
def test_pages_without_a_session_send_to_the_login_page(app, path):
    answer = client(app).get(path)
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login?next=")


def test_a_prediction_end_to_end_and_only_its_owner_sees_it(app, data):
    alice, bob = account(app, "alice"), account(app, "bob")
    dark = upload(alice, png_bytes(value=30), "dark.png")
    light = upload(alice, png_bytes(value=230), "light.png")
    done = wait_done(alice, dark)
    assert done["status"] == "done" and done["label"] == "tumour" and done["error"] is None
    assert done["probabilities"] == pytest.approx({"benign": 30 / 255, "tumour": 1 - 30 / 255})
    assert wait_done(alice, light)["label"] == "benign"
    listed = alice.get("/api/predictions").get_json()
    assert [p["id"] for p in listed] == [light, dark]  # newest first
    assert bob.get("/api/predictions").get_json() == []
    for path in (f"/api/predictions/{dark}", f"/api/predictions/{dark}/heatmap.png",
                 f"/api/predictions/{dark}/files/prediction.json", f"/predictions/{dark}"):  # fmt: skip
        assert bob.get(path).status_code == 404, path
        assert alice.get(path).status_code == 200, path
    png = alice.get(f"/api/predictions/{dark}/heatmap.png")
    assert png.mimetype == "image/png" and png.data.startswith(b"\x89PNG")
    npy = alice.get(f"/api/predictions/{dark}/files/heatmap_cam.npy")
    assert np.load(io.BytesIO(npy.data)).shape == (40, 50)
    assert alice.get(f"/api/predictions/{dark}/files/..%2Fserve.sqlite3").status_code == 404
    assert alice.get(f"/api/predictions/{dark}/files/layer_cam_base.png?inline=1").status_code == 200
    page = alice.get(f"/predictions/{dark}").get_data(as_text=True)
    assert "tumour" in page and 'id="opacity"' in page and 'id="show"' in page and "legend" in page
    history = alice.get("/history").get_data(as_text=True)
    assert "dark.png" in history and "light.png" in history
    # Stored under generated names, in the uploads folder, never under the package's static files.
    stored = sorted(p.name for p in data.uploads.iterdir())
    assert stored and not any("dark" in name or "light" in name for name in stored)


def test_uploads_are_checked_by_content_and_size(app, data):
    c = account(app, "uploader")
    before = set(data.uploads.iterdir())
    disguised = c.post("/api/predictions", data={"file": (io.BytesIO(b"PK\x03\x04" + b"\0" * 200), "slide.png")})
    pickled = c.post("/api/predictions", data={"file": (io.BytesIO(b"\x80\x04\x95" + b"\0" * 200), "slide.svs")})
    assert disguised.status_code == 415 and pickled.status_code == 415 and "content" in disguised.get_json()["error"]
    too_big = c.post("/api/predictions", data={"file": (io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT)), "a.png")})
    assert too_big.status_code == 413 and "MiB" in too_big.get_json()["error"]
    assert c.post("/api/predictions", data={}).status_code == 400
    assert c.post("/api/predictions", data={"file": (io.BytesIO(png_bytes()), "x.png"), "pixel_size": "-1"}
                  ).status_code == 400  # fmt: skip
    assert set(data.uploads.iterdir()) == before  # nothing kept of the refused files
    named_oddly = upload(c, png_bytes(value=200), "notes.txt")  # a PNG, whatever its name
    assert wait_done(c, named_oddly)["label"] == "benign"


def test_corrupt_upload_fails_its_job_with_a_message_and_the_worker_goes_on(app, data):
    c = account(app, "corrupt")
    broken = upload(c, png_bytes()[:60] + b"garbage" * 20, "broken.png")
    answer = wait_done(c, broken)
    assert answer["status"] == "failed" and "broken.png" in answer["error"]
    assert str(data.root) not in answer["error"] and "Traceback" not in answer["error"]
    assert "broken.png" in c.get(f"/predictions/{broken}").get_data(as_text=True)
    assert wait_done(c, upload(c, png_bytes()))["status"] == "done"


def test_a_crashed_worker_fails_its_job_and_is_replaced(app):
    c = account(app, "crasher")
    pool = app.extensions["lightning_streaming"].pool
    pids = pool.worker_pids()
    crash = wait_done(c, upload(c, png_bytes(size=(13, 13)), "crash.png"))
    assert crash["status"] == "failed" and "stopped unexpectedly" in crash["error"]
    assert wait_done(c, upload(c, png_bytes()))["status"] == "done"
    assert pool.worker_pids() != pids and len(pool.worker_pids()) == 1


def test_page_forms_need_their_csrf_token(app):
    account(app, "csrf")
    c = client(app)
    assert c.post("/login", data={"username": "csrf", "password": PASSWORD}).status_code == 400
    assert c.post("/register", data={"username": "csrf2", "password": PASSWORD, "confirm": PASSWORD}).status_code == 400
    assert form_login(c, "csrf").status_code == 302  # with the token
    no_token = c.post("/upload", data={"file": (io.BytesIO(png_bytes()), "x.png")})
    assert no_token.status_code == 400 and "expired" in no_token.get_data(as_text=True)
    assert c.post("/logout").status_code == 400
    assert c.get("/history").status_code == 200  # still logged in
    token = csrf_token(c, "/upload")
    sent = c.post("/upload", data={"file": (io.BytesIO(png_bytes()), "x.png"), "csrf_token": token})
    assert sent.status_code == 302 and sent.headers["Location"].startswith("/predictions/")
    assert c.post("/logout", data={"csrf_token": csrf_token(c, "/upload")}).status_code == 302
    assert c.get("/history").status_code == 302


def test_page_register_logs_in_and_login_never_redirects_off_site(app):
    c = client(app, "192.0.2.12")
    token = csrf_token(c, "/register")
    made = c.post("/register", data={"username": "pageuser", "password": PASSWORD, "confirm": PASSWORD,
                                     "csrf_token": token})  # fmt: skip
    assert made.status_code == 302 and c.get("/history").status_code == 200
    other = client(app)
    token = csrf_token(other, "/login")
    sent = other.post("/login?next=//evil.example/x", data={"username": "pageuser", "password": PASSWORD,
                                                             "csrf_token": token})  # fmt: skip
    assert sent.status_code == 302 and sent.headers["Location"] == "/upload"


def test_failed_logins_are_limited_per_user_and_per_address(app):
    account(app, "target", address="192.0.2.20")
    # Per user name: 3 failures from 3 addresses, then even the right password waits.
    for i in range(3):
        assert client(app, f"198.51.100.{i}").post("/api/login", json={"username": "target", "password": "wrong"}
                                                   ).status_code == 401  # fmt: skip
    blocked = client(app, "198.51.100.9").post("/api/login", json={"username": "target", "password": PASSWORD})
    assert blocked.status_code == 429 and "error" in blocked.get_json()
    # Per address: 3 failures for 3 names, then the address waits, whatever the name.
    account(app, "other", address="192.0.2.21")
    attacker = client(app, "203.0.113.5")
    for i in range(3):
        assert attacker.post("/api/login", json={"username": f"guess{i}", "password": "wrong"}).status_code == 401
    assert attacker.post("/api/login", json={"username": "other", "password": PASSWORD}).status_code == 429
    page = client(app, "203.0.113.5")
    assert form_login(page, "other").status_code == 429  # the pages share the limit
    # Successful log-ins do not count.
    friend = client(app, "192.0.2.21")
    assert all(friend.post("/api/login", json={"username": "other", "password": PASSWORD}).status_code == 200
               for _ in range(4))  # fmt: skip


def test_logout_ends_the_session_and_a_copied_cookie(app):
    c = account(app, "leaver")
    cookie = c.get_cookie("ls_session").value
    assert c.post("/api/logout").status_code == 200
    assert c.get("/api/predictions").status_code == 401
    thief = client(app)
    thief.set_cookie("ls_session", cookie)
    assert thief.get("/api/predictions").status_code == 401


def test_cross_origin_api_writes_are_refused(app):
    c = account(app, "origin")
    evil = c.post("/api/predictions", data={"file": (io.BytesIO(png_bytes()), "x.png")},
                  headers={"Origin": "http://evil.example"})  # fmt: skip
    assert evil.status_code == 403
    same = c.post("/api/predictions", data={"file": (io.BytesIO(png_bytes()), "x.png")},
                  headers={"Origin": "http://localhost"})  # fmt: skip
    assert same.status_code == 202


def test_security_headers(app):
    answer = client(app).get("/")
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Content-Type-Options"] == "nosniff" and answer.headers["X-Frame-Options"] == "DENY"


def test_errors_show_no_traceback(tmp_path):
    app = stub_app(tmp_path / "data")
    try:
        @app.get("/boom")
        def boom():
            raise RuntimeError("secret internals /etc/passwd")

        @app.get("/api/boom")
        def api_boom():
            raise RuntimeError("secret internals /etc/passwd")

        page, api = client(app).get("/boom"), client(app).get("/api/boom")
        assert page.status_code == 500 and api.status_code == 500
        for text in (page.get_data(as_text=True), api.get_data(as_text=True)):
            assert "Traceback" not in text and "secret internals" not in text and "RuntimeError" not in text
        assert api.get_json() == {"error": "Something went wrong on the server. The problem has been logged."}
        assert client(app).get("/nowhere").status_code == 404
    finally:
        app.extensions["lightning_streaming"].pool.stop()


def test_jobs_queue_behind_a_bounded_pool_and_a_memory_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_DELAY", "0.5")
    overhead = 64 * 2**20
    # Room for one job at a time, and an image whose decoded pixels alone exceed the budget.
    app = stub_app(tmp_path / "data", workers=2, job_overhead=overhead, memory_budget=overhead + 2**20)
    try:
        c = account(app, "queue")
        ids = [upload(c, png_bytes(value=v)) for v in (20, 200, 220)]
        huge = upload(c, png_bytes(size=(400, 400)), "huge.png")  # 8 bytes a pixel: 1.3 MB > 1 MiB of room
        answers = [wait_done(c, i) for i in ids]
        assert [a["status"] for a in answers] == ["done"] * 3
        assert [a["label"] for a in answers] == ["tumour", "benign", "benign"]
        pool = app.extensions["lightning_streaming"].pool
        assert pool.state.running_peak == 1 and pool.budget.peak <= pool.budget.total  # never two at once
        started = sorted((a["started"], a["finished"]) for a in answers)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(started, started[1:]))  # one after another
        refused = wait_done(c, huge)
        assert refused["status"] == "failed" and "huge.png needs about" in refused["error"]
    finally:
        app.extensions["lightning_streaming"].pool.stop()


def test_a_restart_keeps_accounts_sessions_and_results_and_requeues_interrupted_jobs(tmp_path):
    first = stub_app(tmp_path / "data")
    c = account(first, "persistent")
    finished = upload(c, png_bytes(value=10))
    assert wait_done(c, finished)["status"] == "done"
    first.extensions["lightning_streaming"].pool.stop()
    database = first.extensions["lightning_streaming"].data.database
    cookie = c.get_cookie("ls_session").value
    # Jobs a stopped server left running: one on its first try, one already retried.
    interrupted, retried = upload(c, png_bytes(value=200)), upload(c, png_bytes(value=200))
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE predictions SET status = 'running', attempts = 1 WHERE id = ?", (interrupted,))
        connection.execute("UPDATE predictions SET status = 'running', attempts = 2 WHERE id = ?", (retried,))
    second = stub_app(tmp_path / "data")
    try:
        again = client(second)
        again.set_cookie("ls_session", cookie)  # the session survives: same signing key
        assert again.get(f"/api/predictions/{finished}").get_json()["label"] == "tumour"
        assert wait_done(again, interrupted)["status"] == "done"
        gave_up = wait_done(again, retried)
        assert gave_up["status"] == "failed" and "restarted" in gave_up["error"]
        assert client(second).post("/api/login", json={"username": "persistent", "password": PASSWORD}).status_code == 200
    finally:
        second.extensions["lightning_streaming"].pool.stop()


def test_the_serve_command_is_listed_and_explains_itself():
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-m", "lightning_streaming", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert listed.returncode == 0 and "serve" in listed.stdout
    helped = subprocess.run([sys.executable, "-m", "lightning_streaming", "serve", "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert helped.returncode == 0
    for option in ("--checkpoint", "--model", "--host", "--port", "--data-dir", "--workers", "--memory-budget"):
        assert option in helped.stdout
    missing = subprocess.run([sys.executable, "-m", "lightning_streaming", "serve", "--checkpoint", "nowhere.ckpt",
                              "--model", "x:Y"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "no checkpoint at nowhere.ckpt" in missing.stderr


def test_the_package_does_not_import_the_web_service():
    import subprocess
    import sys

    code = ("import sys, lightning_streaming as ls; ls.load_model, ls.predict_slide; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'waitress', 'sqlalchemy') "
            "or m.startswith('lightning_streaming.serve')))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
