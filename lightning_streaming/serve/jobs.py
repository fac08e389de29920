"""Predictions as the pages and the API see them: queueing an upload, finding one of the
caller's own predictions, and the files a finished one may serve."""

from __future__ import annotations

from pathlib import Path

from flask import abort, current_app
from sqlalchemy import select
from werkzeug.datastructures import FileStorage

from .database import Prediction, User, db
from .upload import save_upload

__all__ = ["queue_upload", "own_prediction", "own_predictions", "result_file", "shown_filename"]


def shown_filename(name: str | None) -> str:
    """The user's file name as shown back: its last path part, printable, at most 120 characters."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in base if c.isprintable()).strip() or "upload"
    return cleaned[:120]


def queue_upload(user: User, file: FileStorage, base_spacing: float | None) -> Prediction:
    """Store ``file`` under a generated name and queue its prediction.

    Raises:
        UnsupportedUpload: its content is not an image format the service reads.
    """
    data = current_app.extensions["lightning_streaming"].data
    name = shown_filename(file.filename)
    stored, accepted, size = save_upload(file.stream, name, data.uploads)
    prediction = Prediction(user_id=user.id, filename=name, stored_name=stored, kind=accepted.kind,
                            size_bytes=size, base_spacing=base_spacing)  # fmt: skip
    db.session.add(prediction)
    db.session.commit()
    current_app.extensions["lightning_streaming"].pool.notify()
    return prediction


def own_prediction(user: User, prediction_id: str) -> Prediction:
    """The caller's prediction ``prediction_id``; 404 if it does not exist or is someone else's
    (the two are not told apart)."""
    prediction = db.session.get(Prediction, prediction_id) if len(prediction_id) <= 64 else None
    if prediction is None or prediction.user_id != user.id:
        abort(404)
    return prediction


def own_predictions(user: User) -> list[Prediction]:
    """The caller's predictions, newest first."""
    query = select(Prediction).where(Prediction.user_id == user.id)
    return list(db.session.scalars(query.order_by(Prediction.created.desc(), Prediction.id)))


def result_file(prediction: Prediction, name: str) -> Path:
    """A file of a finished prediction, by a name its record lists; 404 for any other name."""
    listed = dict(prediction.files or {})
    for layers in ((prediction.layers or {}).get("heatmaps") or {}).values():
        listed.update({file: file for file in layers.values()})
    if prediction.status != "done" or name not in listed:
        abort(404)
    data = current_app.extensions["lightning_streaming"].data
    folder = data.result_dir(prediction.id).resolve()
    path = (folder / listed[name]).resolve()
    if path.parent != folder or not path.is_file():
        abort(404)
    return path
