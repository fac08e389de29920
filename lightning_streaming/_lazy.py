"""Lazy package attributes: a public name imports its module on first use, so that
``import lightning_streaming`` costs about what ``import torch`` does and imports neither
Lightning nor OpenSlide until a part that needs them is used."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(
    package: str, where: Mapping[str, str], lightning_typed: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for the names in ``where`` (name ->
    module, absolute or relative to ``package``).

    Names in ``lightning_typed`` are classes written once for both Lightning packages: each
    access returns the variant of the package in use (``Class.for_package()``), so they are
    never cached. Other names are cached in the package's namespace after the first access.
    """
    namespace = importlib.import_module(package).__dict__
    dual = frozenset(lightning_typed)

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        if name in dual:
            return value.for_package()
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
