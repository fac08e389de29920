"""Run a function once a module has been imported: at once if it already is, else right after
its import finishes, whoever imports it.

Importing ``lightning_streaming`` must not import Lightning, yet ``Trainer(strategy="streaming")``
must find our names in the StrategyRegistry of whichever Lightning package the user imports,
before or after us. A finder at the front of ``sys.meta_path`` lets the real finders locate the
watched module and wraps that one module's loader so the function runs after its code.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from types import ModuleType
from typing import Callable

__all__ = ["call_after_import"]

log = logging.getLogger(__name__)

_Callback = Callable[[ModuleType], None]


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders for the spec and
    makes that spec's loader call the waiting functions after executing the module."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[_Callback]] = {}
        self._lock = threading.RLock()
        self._searching: set[str] = set()

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        with self._lock:
            if fullname not in self.waiting or fullname in self._searching:
                return None
            self._searching.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            with self._lock:
                self._searching.discard(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self.run(fullname, module)

        # An attribute of this module's own loader instance: other modules' loaders are untouched.
        loader.exec_module = exec_module
        return spec

    def run(self, name: str, module: ModuleType) -> None:
        with self._lock:
            callbacks = self.waiting.pop(name, [])
        for callback in callbacks:
            _call(callback, module)


def _call(callback: _Callback, module: ModuleType) -> None:
    # A failure here must not break the user's import of someone else's package.
    try:
        callback(module)
    except Exception:  # noqa: BLE001
        log.warning("lightning_streaming: setting up after importing %s failed", module.__name__, exc_info=True)


_finder = _AfterImportFinder()


def call_after_import(name: str, callback: _Callback) -> None:
    """Call ``callback(module)`` when the module ``name`` is imported: now, if it is already
    in ``sys.modules``; otherwise once, right after its code has run."""
    module = sys.modules.get(name)
    if module is not None:
        _call(callback, module)
        return
    with _finder._lock:
        _finder.waiting.setdefault(name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
