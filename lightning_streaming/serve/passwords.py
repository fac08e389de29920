"""Password hashing with Argon2id (argon2-cffi's ``PasswordHasher``): memory-hard, salted,
its parameters stored in each hash. The defaults are RFC 9106's second recommended set
(3 passes over 64 MiB, 4 lanes), argon2-cffi's own defaults."""

from __future__ import annotations

from functools import cached_property

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["Passwords"]


class Passwords:
    """Hashes and checks passwords.

    Args:
        time_cost: passes over the memory.
        memory_kib: memory per hash, in KiB (at least 8 MiB).
        parallelism: lanes.
    """

    def __init__(self, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 4) -> None:
        if time_cost < 1 or memory_kib < 8192 or parallelism < 1:
            raise ValueError(f"Argon2 parameters too weak: time_cost={time_cost}, memory_kib={memory_kib} (at least "
                             f"8192), parallelism={parallelism}")  # fmt: skip
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than these (it is remade at the next log-in)."""
        return self._hasher.check_needs_rehash(stored_hash)

    @cached_property
    def dummy_hash(self) -> str:
        """Verified against when a user name does not exist, so both answers take as long."""
        return self._hasher.hash("not a password of anyone")
