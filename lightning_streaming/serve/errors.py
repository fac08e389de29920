"""Error answers: JSON for the API, a plain page for people; never a traceback."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError

__all__ = ["install_error_handlers", "wants_json"]

log = logging.getLogger(__name__)

_PLAIN = {
    400: "The request could not be understood.",
    401: "Please log in first.",
    403: "This request is not allowed.",
    404: "There is nothing here, or it is not yours to see.",
    405: "This address does not take that kind of request.",
    413: "The file is larger than this server accepts.",
    415: "This file is not an image the server reads.",
    429: "Too many attempts. Wait a minute and try again.",
    500: "Something went wrong on the server. The problem has been logged.",
}


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def respond(code: int, title: str, message: str):  # noqa: ANN201 - a Flask response
    """An error answer: ``{"error": message}`` for the API, the error page for people."""
    if wants_json():
        return jsonify(error=message), code
    return render_template("error.html", code=code, title=title, message=message), code


def install_error_handlers(app: Flask) -> None:
    """Answer every HTTP error, and any exception, without internals."""

    @app.errorhandler(CSRFError)
    def _csrf(error: CSRFError):  # noqa: ANN202 - a Flask response
        log.info("CSRF check failed on %s: %s", request.path, error.description)
        return respond(400, "Form expired", "This form has expired or did not come from this site. "
                       "Reload the page and try again.")  # fmt: skip

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException):  # noqa: ANN202 - a Flask response
        code = error.code or 500
        message = _PLAIN.get(code, error.name)
        if code in (400, 403, 413, 415) and error.description and error.description != type(error).description:
            message = error.description
        if code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"The file is larger than this server accepts ({limit / 2**20:.0f} MiB)." if limit else message
        return respond(code, error.name, message)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):  # noqa: ANN202 - a Flask response
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _http(InternalServerError())
