"""A web page and JSON API for the people who read a model's results: register, log in,
upload an image, see the predicted class, the probabilities and where the model looked.

Optional: ``pip install 'lightning_streaming[serve]'``, then ``lightning-streaming serve
--checkpoint CKPT --model module:Class``. Nothing below this package imports it.

The stack, each part the well-kept, boring library made for its job:

- **Flask** (pages and JSON routes, Jinja2 templates with auto-escaping) served by
  **waitress** (a pure-Python production WSGI server: no compiler, runs wherever Python runs,
  bounded threads and request sizes). Flask rather than an async framework: the requests are
  short; the slow work runs in worker processes anyway.
- **Flask-Login** for sessions (Flask's signed, HttpOnly, SameSite=Lax cookies, Secure over
  HTTPS), keyed by a per-user token that log-out replaces, so a copied cookie dies with it.
- **Flask-WTF** (WTForms) for the pages' forms and their CSRF tokens.
- **argon2-cffi** for passwords (Argon2id, memory-hard, RFC 9106 parameters).
- **Flask-Limiter** for rate limits on failed log-ins (per user name and per address) and on
  registrations.
- **Flask-SQLAlchemy** over **SQLite** (a file in the data directory, WAL mode) for accounts
  and jobs; the queue lives in the database, so a restart loses nothing.
- The standard library's **multiprocessing** for the workers: separate processes, so a file
  that crashes an image library fails one job, not the server; a memory budget decides how
  many run at once.

Layout: ``settings`` (options, data directory), ``database`` (models), ``passwords``,
``accounts``, ``forms``, ``upload`` (content sniffing, generated names), ``image_probe``
(opens a file in a child process), ``budget`` (memory estimate), ``pool`` (dispatcher and
workers), ``worker`` (the worker process), ``predictor`` (the thin adapter over
``ls.predict_slide`` and friends), ``jobs``, ``pages``, ``api``, ``security``, ``errors``,
``app`` (``create_app``), ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServeSettings

__all__ = ["create_app", "ServeSettings"]

__getattr__, __dir__ = lazy_attributes(__name__, {"create_app": ".app", "ServeSettings": ".settings"})
