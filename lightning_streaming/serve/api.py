"""The JSON API beside the pages, for scripts and tests.

``GET /healthz``; ``POST /api/register`` and ``POST /api/login`` with ``{"username",
"password"}``; ``POST /api/logout``; ``POST /api/predictions`` (multipart field ``file``,
optional ``pixel_size`` in um/px); ``GET /api/predictions`` (the caller's own, newest first);
``GET /api/predictions/<id>``; ``GET /api/predictions/<id>/heatmap.png`` (optional
``?kind=``); ``GET /api/predictions/<id>/files/<name>``. Without a session: 401; another
user's prediction: 404.
"""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, abort, current_app, jsonify, request, send_file
from flask_login import current_user, login_required, login_user, logout_user

from . import accounts
from .jobs import own_prediction, own_predictions, queue_upload, result_file
from .upload import UnsupportedUpload

__all__ = ["api"]

api = Blueprint("api", __name__)


def _credentials() -> tuple[str, str]:
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("username"), str) or not isinstance(
        body.get("password"), str
    ):
        abort(400, 'Send JSON {"username": ..., "password": ...}.')
    return body["username"], body["password"]


@api.get("/healthz")
def healthz():  # noqa: ANN201 - Flask responses
    state = current_app.extensions["lightning_streaming"].pool.state
    if state.ready:
        return jsonify(status="ready", model=state.model)
    if state.error:
        return jsonify(status="error", error="The model could not be loaded; see the server's log."), 503
    return jsonify(status="loading"), 503


@api.post("/api/register")
def register():  # noqa: ANN201
    username, password = _credentials()
    try:
        user = accounts.register(username, password)
    except accounts.AccountError as error:
        return jsonify(error=str(error), field=error.field), error.status
    return jsonify(username=user.username), 201


@api.post("/api/login")
def login():  # noqa: ANN201
    username, password = _credentials()
    user = accounts.authenticate(username, password)
    if user is None:
        return jsonify(error="Wrong user name or password."), 401
    login_user(user)
    return jsonify(username=user.username)


@api.post("/api/logout")
@login_required
def logout():  # noqa: ANN201
    accounts.end_sessions(current_user._get_current_object())
    logout_user()
    return jsonify(ok=True)


@api.post("/api/predictions")
@login_required
def create_prediction():  # noqa: ANN201
    file = request.files.get("file")
    if file is None:
        abort(400, "Send the image as the multipart field 'file'.")
    spacing = _pixel_size(request.form.get("pixel_size"))
    try:
        prediction = queue_upload(current_user._get_current_object(), file, spacing)
    except UnsupportedUpload as error:
        abort(415, str(error))
    return jsonify(id=prediction.id, status=prediction.status), 202


def _pixel_size(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.01 <= value <= 1000):
        abort(400, "pixel_size must be a number of um per pixel between 0.01 and 1000.")
    return value


@api.get("/api/predictions")
@login_required
def list_predictions():  # noqa: ANN201
    return jsonify([p.as_json() for p in own_predictions(current_user)])


@api.get("/api/predictions/<prediction_id>")
@login_required
def get_prediction(prediction_id: str):  # noqa: ANN201
    return jsonify(own_prediction(current_user, prediction_id).as_json())


@api.get("/api/predictions/<prediction_id>/heatmap.png")
@login_required
def heatmap_png(prediction_id: str):  # noqa: ANN201
    prediction = own_prediction(current_user, prediction_id)
    if prediction.status != "done":
        return jsonify(error=f"The prediction is {prediction.status}; it has no heatmap yet."), 409
    heatmaps = (prediction.layers or {}).get("heatmaps") or {}
    kind = request.args.get("kind") or next(iter(heatmaps), None)
    if kind not in heatmaps:
        abort(404)
    return send_file(result_file(prediction, heatmaps[kind]["overlay"]), mimetype="image/png")


@api.get("/api/predictions/<prediction_id>/files/<name>")
@login_required
def download(prediction_id: str, name: str):  # noqa: ANN201
    prediction = own_prediction(current_user, prediction_id)
    inline = request.args.get("inline") == "1" and name.endswith(".png")
    return send_file(result_file(prediction, name), as_attachment=not inline, download_name=name)
