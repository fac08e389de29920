"""Password hashing with Argon2id (argon2-cffi's ``PasswordHasher``, RFC 9106's
recommended parameters): memory-hard, salted, parameters stored in each hash."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["hash_password", "verify_password", "needs_rehash", "DUMMY_HASH"]

_HASHER = PasswordHasher()
#: Verified against when a user name does not exist, so both cases take the same time.
DUMMY_HASH = _HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _HASHER.check_needs_rehash(stored_hash)
