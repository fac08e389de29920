"""Protections around every response: session cookies marked ``Secure`` whenever the request
came over HTTPS, security headers, and a same-origin check on the API's state-changing
requests (the pages' forms carry CSRF tokens instead)."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, abort, request
from flask.sessions import SecureCookieSessionInterface

__all__ = ["HttpsAwareSessions", "install_security"]

_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip


class HttpsAwareSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the ``Secure`` flag set when this request came over
    HTTPS (directly, or through a proxy trusted with ``X-Forwarded-Proto``), not only when the
    configuration says so."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"] or request.is_secure)


def install_security(app: Flask) -> None:
    """Register the checks and headers on ``app``."""
    app.session_interface = HttpsAwareSessions()

    @app.before_request
    def _same_origin_api_writes() -> None:
        # A browser sends Origin with every cross-origin POST; scripts send none. A POST to the
        # API from another site's page is refused even if a browser would attach the cookie.
        if request.method in ("GET", "HEAD", "OPTIONS") or not request.path.startswith("/api/"):
            return
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            abort(403, "cross-origin request refused")

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        if request.endpoint not in ("static",):
            response.headers.setdefault("Cache-Control", "no-store")
        return response
