"""Our Lightning-typed classes, written once and built for each Lightning package.

A Trainer accepts only strategies, callbacks and DataModules derived from its own package's
classes: ``lightning.pytorch`` (``import lightning as L``) and ``pytorch_lightning`` each have
their own ``Strategy``, ``Callback`` and ``LightningDataModule``. So one class cannot serve both.
Here a class is written once as a *template*, a plain class that names its Lightning base by
its path inside the package::

    class StreamingLSUV(LightningTyped, lightning_base="callbacks.Callback"):
        ...

and :meth:`~_LightningTypedMeta.for_package` builds (once, lazily) the *variant* of each
package: a subclass of the template and of that package's base, with the template's name, so
messages, ``repr`` and checkpoint keys read the same under both. The public names
(``ls.StreamingLSUV``) are the variant of the package in use (:func:`choose_package`); calling a
template builds that variant's instance. ``isinstance(x, ls.StreamingLSUV)`` holds for either
package's variant, and variants pickle by reference (DDP spawn), each to its own package.

Nothing here imports Lightning until a variant is built.
"""

from __future__ import annotations

import copyreg
import importlib
import importlib.util
import sys
import types
from abc import ABCMeta
from typing import Any, Union

__all__ = [
    "LIGHTNING",
    "PYTORCH_LIGHTNING",
    "PACKAGES",
    "LightningTyped",
    "choose_package",
    "installed_packages",
    "lightning_import",
    "package_name",
]

#: ``import lightning as L``: the Trainer lives in ``lightning.pytorch``.
LIGHTNING = "lightning.pytorch"
#: The standalone ``pytorch_lightning`` package.
PYTORCH_LIGHTNING = "pytorch_lightning"
#: In order of preference when nothing else decides.
PACKAGES = (LIGHTNING, PYTORCH_LIGHTNING)

_TOP_LEVEL = {LIGHTNING: "lightning", PYTORCH_LIGHTNING: "pytorch_lightning"}
_ALIASES = {"lightning": LIGHTNING, LIGHTNING: LIGHTNING, PYTORCH_LIGHTNING: PYTORCH_LIGHTNING}
_INSTALL_HINT = (
    "lightning_streaming's Lightning integration needs PyTorch Lightning: pip install lightning "
    "(import lightning as L), or pip install pytorch-lightning (import pytorch_lightning as pl)"
)

PackageLike = Union[str, types.ModuleType, None]


def package_name(package: PackageLike) -> str:
    """The canonical name of a Lightning package: ``"lightning.pytorch"`` or
    ``"pytorch_lightning"``, from such a name, ``"lightning"``, or the module itself
    (``L``, ``L.pytorch`` or ``pl``)."""
    if isinstance(package, types.ModuleType):
        package = package.__name__
    if package not in _ALIASES:
        raise ValueError(
            f"unknown Lightning package {package!r}: use 'lightning' (or 'lightning.pytorch'), 'pytorch_lightning', "
            "or the imported module itself"
        )
    return _ALIASES[package]


def installed_packages() -> list[str]:
    """The Lightning packages that can be imported here (without importing them)."""
    found = []
    for package in PACKAGES:
        try:
            if importlib.util.find_spec(_TOP_LEVEL[package]) is not None:
                found.append(package)
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
            continue
    return found


def lightning_import(package: PackageLike, path: str = "") -> Any:
    """Import ``package`` (see :func:`package_name`) or something inside it: ``path`` is a
    submodule (``"strategies"``) or an attribute of one (``"strategies.DDPStrategy"``)."""
    root = package_name(package)
    if not path:
        return importlib.import_module(root)
    try:
        return importlib.import_module(f"{root}.{path}")
    except ModuleNotFoundError as error:
        module, _, attribute = path.rpartition(".")
        if error.name != f"{root}.{path}":
            raise
    return getattr(importlib.import_module(f"{root}.{module}" if module else root), attribute)


def choose_package() -> str:
    """The Lightning package our public classes are built on, as the user would expect.

    - Only one installed: that one.
    - Both installed: the one imported (``sys.modules``); when both are imported, the one
      the calling code uses (the nearest caller outside this library whose module, globals
      or locals belong to exactly one of them, e.g. ``import pytorch_lightning as pl``);
      otherwise ``lightning``.

    Use ``Class.for_package(...)`` to choose explicitly.

    Raises:
        ModuleNotFoundError: neither package is installed (the message says how to install one).
    """
    installed = installed_packages()
    if not installed:
        raise ModuleNotFoundError(_INSTALL_HINT, name="lightning")
    if len(installed) == 1:
        return installed[0]
    imported = [p for p in installed if sys.modules.get(p) is not None]
    if len(imported) == 1:
        return imported[0]
    if imported:
        caller = _package_of_callers()
        if caller is not None:
            return caller
    return LIGHTNING


def _package_of(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    for package, top in _TOP_LEVEL.items():
        if name == top or name.startswith(top + "."):
            return package
    return None


def _packages_used_by(frame: types.FrameType) -> set[str]:
    own = _package_of(frame.f_globals.get("__name__"))
    if own is not None:
        return {own}
    found = set()
    for namespace in (frame.f_locals, frame.f_globals):
        for value in list(namespace.values()):
            if isinstance(value, types.ModuleType):
                name = value.__name__
            elif isinstance(value, (type, types.FunctionType)):
                name = value.__module__
            else:
                continue
            package = _package_of(name)
            if package is not None:
                found.add(package)
    return found


def _package_of_callers() -> str | None:
    """The package the nearest caller outside this library (and the import machinery) uses,
    when that caller uses exactly one; None when it uses both, or no caller uses either."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if not module.startswith(("lightning_streaming.", "importlib")) and module != "lightning_streaming":
            used = _packages_used_by(frame)
            if len(used) == 1:
                return used.pop()
            if used:
                return None
        frame = frame.f_back  # type: ignore[assignment]
    return None


#: (template, package) -> the variant built for it.
_VARIANTS: dict[tuple[type, str], type] = {}


class _LightningTypedMeta(ABCMeta):
    """Builds, checks and pickles the per-package variants of :class:`LightningTyped` templates."""

    def for_package(cls, package: PackageLike = None) -> type:
        """This class for one Lightning package: ``"lightning"`` (or ``"lightning.pytorch"``),
        ``"pytorch_lightning"``, the module itself (``L``, ``pl``), or None for the one in use
        (see :func:`choose_package`). Subclass it to extend the class for that package.

        Example::

            import pytorch_lightning as pl
            strategy = ls.StreamingStrategy.for_package(pl)(tile_size=1024)
        """
        name = package_name(package) if package is not None else choose_package()
        template = cls.__dict__.get("_lightning_template")
        if template is None and cls._lightning_package is not None:
            # A user's subclass of one package's variant exists for that package only.
            if name == cls._lightning_package:
                return cls
            raise TypeError(
                f"{cls.__qualname__} derives from the {cls._lightning_package} variant of a lightning_streaming class, "
                f"so it cannot serve {name}; derive it from the class's for_package({name!r}) instead"
            )
        template = template or cls
        key = (template, name)
        if key not in _VARIANTS:
            _VARIANTS[key] = _build(template, name)
        return _VARIANTS[key]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls._lightning_package is None:  # a template: instantiate the variant in use
            return cls.for_package(choose_package())(*args, **kwargs)
        # Not super(): a __class__ cell here would make Lightning's save_hyperparameters (before
        # 2.6) take this frame for a constructor's while it walks up the frames of __init__.
        return type.__call__(cls, *args, **kwargs)

    # The variants we build stand for the whole class: either package's instance is one of them.
    def __instancecheck__(cls, instance: Any) -> bool:
        template = cls.__dict__.get("_lightning_template")
        if template is not None:
            return type.__instancecheck__(template, instance)
        return super().__instancecheck__(instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        template = cls.__dict__.get("_lightning_template")
        if template is not None:
            return type.__subclasscheck__(template, subclass)
        return super().__subclasscheck__(subclass)


class LightningTyped(metaclass=_LightningTypedMeta):
    """Base of a class that needs a Lightning base class, written once for both packages.

    Declare the base by its path inside the package: ``class X(LightningTyped,
    lightning_base="callbacks.Callback")``. Inside methods, ``self._lightning`` is the package
    module of the variant running (``lightning.pytorch`` or ``pytorch_lightning``); import
    anything else from it with ``lightning_import(self._lightning, "utilities.model_helpers")``.
    Public names should resolve to ``X.for_package()`` at access time (see
    ``lightning_streaming.lightning.__getattr__``).
    """

    _lightning_base: str = ""
    _lightning_package: str | None = None
    _lightning: types.ModuleType

    def __init_subclass__(cls, lightning_base: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if lightning_base is not None:
            cls._lightning_base = lightning_base


def _build(template: type, package: str) -> type:
    if not template._lightning_base:  # type: ignore[attr-defined]
        raise TypeError(f"{template.__qualname__} names no lightning_base")
    base = lightning_import(package, template._lightning_base)  # type: ignore[attr-defined]
    namespace = {
        "__module__": template.__module__,
        "__qualname__": template.__qualname__,
        "__doc__": template.__doc__,
        "_lightning_template": template,
        "_lightning_package": package,
        "_lightning": lightning_import(package),
    }
    return _LightningTypedMeta(template.__name__, (template, base), namespace)


def _variant(template: type, package: str) -> type:
    """Unpickling a variant: the same package's variant of the same template."""
    return template.for_package(package)  # type: ignore[attr-defined]


def _reduce_class(cls: type) -> Any:
    template = cls.__dict__.get("_lightning_template")
    if template is None:
        return cls.__qualname__  # templates and users' subclasses pickle by name, as usual
    return _variant, (template, cls._lightning_package)  # type: ignore[attr-defined]


# Pickle consults copyreg before treating a class with a metaclass as a plain global.
copyreg.pickle(_LightningTypedMeta, _reduce_class)
