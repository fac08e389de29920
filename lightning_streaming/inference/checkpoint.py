"""Load a trained model from a checkpoint, safely (``weights_only=True``) and with clear errors."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..lightning.info import CHECKPOINT_KEY, ModelInfo

__all__ = ["CheckpointError", "load_model", "resolve_class"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model class given: missing, unreadable,
    not a checkpoint, or saved from another model."""


def resolve_class(model_class: type | str) -> type:
    """A class, or ``"package.module:Class"`` imported (from the working directory too, so
    ``examples.slide_demo:SlideClassifier`` works from a clone's root)."""
    if isinstance(model_class, type):
        return model_class
    if not isinstance(model_class, str) or model_class.count(":") != 1:
        raise ValueError(
            f"the model class must be a class or 'module:Class' (e.g. 'examples.slide_demo:SlideClassifier'), got "
            f"{model_class!r}"
        )
    module_name, _, qualname = model_class.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing != module_name.split(".")[0]:
            raise  # the module exists but imports something that is not installed
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: modules of the folder you run in
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as again:
            if (again.name or "").split(".")[0] != missing:
                raise
            raise ModuleNotFoundError(
                f"cannot import {module_name!r} (for the model class {model_class!r}) from {os.getcwd()} or the "
                "installed packages: run from the folder that holds it, or install it",
                name=module_name,
            ) from error
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ValueError(f"module {module_name!r} has no class {qualname!r} (for the model class {model_class!r})")
    if not isinstance(found, type):
        raise ValueError(f"{model_class!r} is a {type(found).__name__}, not a class")
    return found


def _read(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {where}; give the path of a .ckpt (or .pt) file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds Python objects other than tensors and plain data, which are not loaded "
            f"(weights_only=True, PyTorch's default: loading them could run code from the file). Re-save it with "
            f"plain hyperparameters (lightning_streaming's classes save plain data). Details: {error}"
        ) from error
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on a file that is not a checkpoint
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); it may be truncated "
        "or another kind of file"
    )


def _init_arguments(cls: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(hparams)
    return {k: v for k, v in hparams.items() if k in parameters}


def load_model(
    checkpoint: str | os.PathLike, model_class: type | str, map_location: Any = "cpu"
) -> nn.Module:
    """Load a trained model for inference, in eval mode.

    The file is read with ``torch.load(weights_only=True)`` (PyTorch's default: nothing in
    it can run code). A Lightning checkpoint's ``hyper_parameters`` are passed to
    ``model_class(...)`` (as ``load_from_checkpoint`` does) and its ``state_dict`` loaded
    strictly; a bare state dict is loaded into ``model_class()``. The record of
    :class:`~lightning_streaming.ModelInfo` (classes, spacing, normalisation) is read back,
    with ``checkpoint`` set to the file.

    Args:
        checkpoint: the ``.ckpt`` file.
        model_class: the model's class, or ``"module:Class"``.
        map_location: where tensors go (``torch.load``'s argument).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, holds objects that are not
            plain data, or was saved from another model class (the message names it).

    Example::

        model = ls.load_model("results/demo/model.ckpt", "examples.slide_demo:SlideClassifier")
        print(ls.model_info(model).classes)
    """
    path = Path(checkpoint)
    cls = resolve_class(model_class)
    data = _read(path, map_location)
    lightning = isinstance(data, Mapping) and "state_dict" in data
    state = data["state_dict"] if lightning else data
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict (a mapping of names to tensors)")
    record = data.get(CHECKPOINT_KEY) if lightning else None
    saved_class = record.get("model_class") if isinstance(record, Mapping) else None
    if isinstance(saved_class, str) and saved_class.rpartition(":")[2].rpartition(".")[2] != cls.__name__:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from {saved_class}, not {cls.__module__}:{cls.__qualname__}; load it "
            f"with that class (--model module:{saved_class.rpartition(':')[2]})"
        )
    hparams = data.get("hyper_parameters", {}) if lightning else {}
    try:
        model = cls(**_init_arguments(cls, hparams))
    except TypeError as error:
        raise CheckpointError(
            f"{cls.__qualname__}(**hyperparameters of {str(path)!r}) failed: {error}. Was the checkpoint saved from "
            "another model class?"
        ) from error
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {cls.__qualname__}: {str(error).strip()}"
            + (f". It was saved from {saved_class}" if saved_class else ". Was it saved from another model class?")
        ) from error
    if result.missing_keys or result.unexpected_keys:
        def shown(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {cls.__qualname__}: "
            + (f"its weights lack {shown(result.missing_keys)}" if result.missing_keys else "")
            + ("; " if result.missing_keys and result.unexpected_keys else "")
            + (f"it has weights the model does not: {shown(result.unexpected_keys)}" if result.unexpected_keys else "")
            + (f". It was saved from {saved_class}" if saved_class else ". Was it saved from another model class?")
        )
    if lightning and hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(data)
    info = getattr(model, "model_info", None)
    if isinstance(info, ModelInfo) or hasattr(model, "streaming_split"):
        model.model_info = (info if isinstance(info, ModelInfo) else ModelInfo()).merged(ModelInfo())
        model.model_info.checkpoint = str(path)
    log.info("loaded %s from %s", cls.__qualname__, path)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
