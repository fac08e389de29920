"""Accounts: registering, checking a password, and Flask-Login's session loading. Shared by
the pages and the JSON API."""

from __future__ import annotations

import logging
import re

from flask import current_app
from flask_login import LoginManager
from sqlalchemy import func, select

from .database import User, db
from .passwords import Passwords

__all__ = ["AccountError", "login_manager", "register", "authenticate", "USERNAME_RULE", "PASSWORD_RULE"]

log = logging.getLogger(__name__)

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{2,63}")
USERNAME_RULE = "3 to 64 letters, digits or . _ @ -, starting with a letter or digit"
PASSWORD_MIN, PASSWORD_MAX = 10, 256
PASSWORD_RULE = f"{PASSWORD_MIN} to {PASSWORD_MAX} characters"

login_manager = LoginManager()
login_manager.login_view = "pages.login"
login_manager.login_message = "Please log in to see this page."
login_manager.login_message_category = "info"


@login_manager.user_loader
def _load_user(session_token: str) -> User | None:
    return db.session.scalar(select(User).where(User.session_token == session_token))


class AccountError(ValueError):
    """A registration that cannot be made; ``field`` names the input at fault."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def _passwords() -> Passwords:
    return current_app.extensions["lightning_streaming"].passwords


def normalise(username: str) -> str:
    return (username or "").strip()


def find(username: str) -> User | None:
    """The account of ``username`` (case-insensitive), or None."""
    return db.session.scalar(select(User).where(func.lower(User.username) == normalise(username).lower()))


def register(username: str, password: str) -> User:
    """Create an account (the password is stored only as its Argon2id hash).

    Raises:
        AccountError: the name or password breaks the rules, or the name is taken (status 409).
    """
    username = normalise(username)
    if not USERNAME.fullmatch(username):
        raise AccountError(f"User name: {USERNAME_RULE}.", "username")
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise AccountError(f"Password: {PASSWORD_RULE}.", "password")
    if find(username) is not None:
        raise AccountError("That user name is taken; choose another.", "username", status=409)
    user = User(username=username, password_hash=_passwords().hash(password))
    db.session.add(user)
    db.session.commit()
    log.info("registered user %s", username)
    return user


def authenticate(username: str, password: str) -> User | None:
    """The account whose name and password these are, else None. Takes one hash
    verification either way, so the answer's time does not say whether the name exists."""
    user = find(username)
    if not isinstance(password, str) or len(password) > PASSWORD_MAX:
        return None
    passwords = _passwords()
    if user is None:
        passwords.verify(passwords.dummy_hash, password)
        return None
    if not passwords.verify(user.password_hash, password):
        return None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash(password)
        db.session.commit()
    return user


def end_sessions(user: User) -> None:
    """Log out every session of ``user``: the cookies name a token that no longer exists."""
    user.new_session_token()
    db.session.commit()
