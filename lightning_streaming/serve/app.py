"""The Flask application: configuration, extensions, blueprints, and the worker pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from flask import Flask, abort, redirect, request, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import event

from . import accounts
from .api import api
from .database import db, sqlite_pragmas
from .errors import install_error_handlers, wants_json
from .pages import pages
from .passwords import Passwords
from .pool import WorkerPool
from .security import install_security
from .settings import DataDir, ServeSettings

__all__ = ["create_app", "Service"]

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What one app holds beside Flask: its settings, data directory, pool, rate limiter and
    password hasher."""

    settings: ServeSettings
    data: DataDir
    pool: WorkerPool
    limiter: Limiter
    passwords: Passwords


def create_app(settings: ServeSettings, *, start_workers: bool = True) -> Flask:
    """Build the web service for ``settings`` (creating its data directory and database) and,
    unless ``start_workers`` is False, start its prediction workers. Stop them with
    ``app.extensions["lightning_streaming"].pool.stop()``.
    """
    data = DataDir(settings.data_dir)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=data.secret_key(),
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{data.database}",
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        SESSION_COOKIE_NAME="ls_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=False,  # set per request: see security.HttpsAwareSessions
        REMEMBER_COOKIE_HTTPONLY=True,
        WTF_CSRF_TIME_LIMIT=None,  # a token lives as long as the session it belongs to
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    db.init_app(app)
    with app.app_context():
        event.listen(db.engine, "connect", sqlite_pragmas)
        db.create_all()
    CSRFProtect(app).exempt(api)  # the pages' forms carry tokens; the API checks Origin (security.py)
    accounts.login_manager.init_app(app)
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://", headers_enabled=True)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    _limit_logins(app, limiter, settings)
    install_security(app)
    install_error_handlers(app)

    @accounts.login_manager.unauthorized_handler
    def _unauthorized():  # noqa: ANN202
        if wants_json():
            abort(401)
        return redirect(url_for("pages.login", next=request.path))

    pool = WorkerPool(app, settings, data)
    passwords = Passwords(*settings.argon2)
    app.extensions["lightning_streaming"] = Service(settings, data, pool, limiter, passwords)
    if start_workers:
        pool.start()
    return app


def _username_key() -> str:
    body = request.get_json(silent=True) if request.is_json else None
    name = body.get("username") if isinstance(body, dict) else request.form.get("username")
    return "user:" + (name if isinstance(name, str) else "").strip().lower()[:64]


def _failed(response) -> bool:  # noqa: ANN001 - a Flask response
    return response.status_code == 401


def _limit_logins(app: Flask, limiter: Limiter, settings: ServeSettings) -> None:
    """Failed log-ins limited per user name and per address; new accounts per address."""

    def limited(endpoint: str, *rules: Callable) -> None:
        view = app.view_functions[endpoint]
        for rule in rules:
            view = rule(view)
        app.view_functions[endpoint] = view

    # Shared limits: the page and the API count together.
    login_rules = (
        limiter.shared_limit(settings.login_limit, "login-user", key_func=_username_key, deduct_when=_failed,
                             methods=["POST"]),
        limiter.shared_limit(settings.login_limit, "login-address", key_func=get_remote_address,
                             deduct_when=_failed, methods=["POST"]),
    )  # fmt: skip
    for endpoint in ("pages.login", "api.login"):
        limited(endpoint, *login_rules)
    register_rule = limiter.shared_limit(settings.register_limit, "register-address", key_func=get_remote_address,
                                         methods=["POST"])  # fmt: skip
    for endpoint in ("pages.register", "api.register"):
        limited(endpoint, register_rule)
