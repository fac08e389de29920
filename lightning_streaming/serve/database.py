"""The service's records in SQLite through Flask-SQLAlchemy: accounts and predictions."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import datetime, timezone
from typing import Any

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["db", "User", "Prediction", "STATUSES", "sqlite_pragmas", "utcnow"]

STATUSES = ("queued", "running", "done", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def sqlite_pragmas(connection: Any, _record: Any) -> None:
    """On each new SQLite connection (an engine "connect" listener): write-ahead logging
    (readers never wait for the writer), a busy timeout and foreign keys."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class User(db.Model):
    """An account. ``password_hash`` is an Argon2id hash; ``session_token`` is what the session
    cookie names (Flask-Login's alternative id), replaced at log-out so old cookies stop working."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    session_token: Mapped[str] = mapped_column(
        String(64), unique=True, nullable=False, default=lambda: secrets.token_urlsafe(32)
    )
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    predictions: Mapped[list["Prediction"]] = relationship(back_populates="user")

    # Flask-Login's interface
    is_active = True
    is_authenticated = True
    is_anonymous = False

    def get_id(self) -> str:
        return self.session_token

    def new_session_token(self) -> None:
        self.session_token = secrets.token_urlsafe(32)


class Prediction(db.Model):
    """One uploaded image and what the model made of it."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True, nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)  # as the user named it; shown, never used
    stored_name: Mapped[str] = mapped_column(String(64), nullable=False)  # generated, under uploads/
    kind: Mapped[str] = mapped_column(String(32), nullable=False)  # what its first bytes say it is
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    base_spacing: Mapped[float | None] = mapped_column(nullable=True)  # um/px given by the user
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True, nullable=False)
    progress: Mapped[float] = mapped_column(default=0.0, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    image: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # facts read from the file
    label: Mapped[str | None] = mapped_column(String(255), nullable=True)
    probabilities: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    value: Mapped[float | None] = mapped_column(nullable=True)
    files: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # download name -> file under results/<id>/
    layers: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # what the result page shows
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True, nullable=False)
    started: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    user: Mapped[User] = relationship(back_populates="predictions")

    def as_json(self) -> dict[str, Any]:
        """The API's view: the fields the issue names, then the rest."""
        return {
            "id": self.id,
            "status": self.status,
            "label": self.label,
            "probabilities": self.probabilities,
            "error": self.error,
            "value": self.value,
            "progress": round(self.progress, 4),
            "filename": self.filename,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "heatmaps": sorted((self.layers or {}).get("heatmaps", {})),
            "files": sorted(self.files or {}),
        }

    def __repr__(self) -> str:
        return f"Prediction({self.id}, {self.status}, {json.dumps(self.filename)})"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.replace(tzinfo=timezone.utc).isoformat()
