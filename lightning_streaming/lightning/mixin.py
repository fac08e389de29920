"""StreamingMixin: a LightningModule whose trunk is streamed when the strategy says so."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..core import stream
from ..core.source import is_region_source
from .info import CHECKPOINT_KEY, ModelInfo, transform_record
from .info import model_info as resolve_model_info
from .settings import DEFAULT_TILE_SIZE, StreamingSettings, TileSize


@dataclass(frozen=True)
class TrunkOverride:
    """How :meth:`StreamingMixin.forward_trunk` runs inside :meth:`StreamingMixin.streaming`
    (or the inference code's own context): streamed with these settings, or conventionally."""

    enabled: bool = True
    tile_size: TileSize | None = None
    tile_device: torch.device | None = None
    keep_graphs: int | None = None
    #: Without ``tile_size``: the core's planner chooses the tiles within these bytes.
    memory_budget: int | None = None
    #: Inference: stream without a graph, then hand the output to this function (which may
    #: record it and return a leaf that requires grad, for heatmaps).
    capture: Callable[[Any], Any] | None = None


# Per model (by id), per thread and task: a web server may run several predictions at once.
_OVERRIDES: contextvars.ContextVar[Mapping[int, TrunkOverride]] = contextvars.ContextVar(
    "lightning_streaming_trunk_overrides", default={}
)


@contextlib.contextmanager
def trunk_override(model: nn.Module, override: TrunkOverride) -> Iterator[None]:
    """Run ``model``'s trunk as ``override`` says inside the block (this thread only)."""
    token = _OVERRIDES.set({**_OVERRIDES.get(), id(model): override})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


class StreamingMixin:
    """Mix into a :class:`~pytorch_lightning.core.LightningModule` whose network is a
    *trunk* of local layers (streamed: run tile by tile) followed by a *head* (run
    normally: global pooling, BatchNorm, Linear, anything).

    The model declares the split: either attributes ``self.trunk`` and ``self.head``, or an
    override of :meth:`streaming_split`. :func:`~lightning_streaming.split_at` splits an
    existing network (e.g. a torchvision ResNet) at a named child.

    ``self(x)`` is ``self.head(self.forward_trunk(x))``. :meth:`forward_trunk` streams the
    trunk when the Trainer's strategy is a streaming one
    (:class:`~lightning_streaming.StreamingStrategy`,
    :class:`~lightning_streaming.StreamingDDPStrategy`, ``strategy="streaming"`` or
    ``"streaming_ddp"``) and runs it conventionally under any other strategy, with the same
    numbers either way. Training, validation, test and predict steps all stream; outside
    training no graph is kept.

    Outside a running Trainer (plain PyTorch ``model(x)``, or after ``fit`` has returned), an
    input larger than one tile
    (``default_tile_size``, else 1024 px) or a lazy :class:`~lightning_streaming.RegionSource`
    is streamed, so a whole slide never runs through the trunk at once; smaller tensors run
    conventionally (one tile would be the same computation). Gradients flow either way.
    :meth:`streaming` sets the tile size for a block of code, or turns streaming off.

    Inference: the default :meth:`predict_step` returns per-class probabilities (or the
    regression values) with each slide's identity, and the model's checkpoints record what
    inference needs (:class:`~lightning_streaming.ModelInfo`: class names, task, training
    spacing, the ``Uint8Normalize`` of its ``tile_transform``), taken from the DataModule it
    was trained with unless ``model.model_info`` says otherwise. If you override
    ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()`` in them. Automatic optimization, gradient
    accumulation and clipping, optimizers, schedulers, mixed precision and checkpoints are
    Lightning's own and work unchanged. Override :meth:`forward` freely: call
    :meth:`forward_trunk` where the trunk runs.

    What a model may set:

    - ``default_tile_size`` (class attribute): the tile size to use when the strategy
      does not set one (tile size is a hardware concern, so the strategy's setting wins).
    - ``tile_transform``: a method ``tile_transform(self, tile)`` (or a callable assigned
      in ``__init__``), a per-pixel function such as normalising uint8 pixels to float,
      applied to each tile on its device before the trunk, so the full float image never
      exists. Conventionally it is applied to the whole input. It must be pixel-wise: it
      is not analysed.

    Example::

        import pytorch_lightning as pl
        import torch
        from torch import nn
        import lightning_streaming as ls

        class SlideClassifier(ls.StreamingMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1))
                self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=2048), max_epochs=1)
    """

    default_tile_size: TileSize | None = None
    tile_transform: Callable[[Tensor], Tensor] | None = None
    #: What inference needs to know (class names, spacing, ...); see :class:`ModelInfo`.
    model_info: ModelInfo | None = None

    def streaming_split(self) -> tuple[nn.Module, nn.Module]:
        """The ``(trunk, head)`` pair; by default the attributes ``trunk`` and ``head``."""
        trunk, head = getattr(self, "trunk", None), getattr(self, "head", None)
        if not isinstance(trunk, nn.Module) or not isinstance(head, nn.Module):
            missing = [name for name, m in (("trunk", trunk), ("head", head)) if not isinstance(m, nn.Module)]
            raise AttributeError(
                f"{type(self).__name__} uses StreamingMixin but has no module attribute "
                f"{' or '.join(map(repr, missing))}: "
                "set self.trunk (the streamed, local layers) and self.head (the rest) in __init__, e.g. "
                "self.trunk, self.head = lightning_streaming.split_at(network, 'layer2'), or override streaming_split()"
            )
        return trunk, head

    @property
    def streaming_settings(self) -> StreamingSettings | None:
        """The attached Trainer's streaming settings; None when the trunk runs conventionally."""
        trainer = getattr(self, "_trainer", None)  # LightningModule.trainer raises when detached
        settings = getattr(trainer.strategy, "streaming", None) if trainer is not None else None
        return settings if isinstance(settings, StreamingSettings) else None

    def streaming_transform(self) -> Callable[[Tensor], Tensor] | None:
        """The model's ``tile_transform``, whether a method, a callable or a module."""
        # A module assigned to self.tile_transform lives in _modules, hidden by the class attribute.
        return self._modules.get("tile_transform", self.tile_transform)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def streaming(
        self, tile_size: TileSize | None = None, *, enabled: bool = True, tile_device: torch.device | str | None = None
    ) -> Iterator[None]:
        """Within the block, ``self(x)`` streams the trunk with ``tile_size`` (default: the
        model's ``default_tile_size``, else 1024), whatever the input's size and whether or
        not a Trainer is attached; with ``enabled=False`` it runs the trunk conventionally
        (a lazy input is then read whole). Applies to the calling thread only.

        Example::

            with model.streaming(tile_size=4096), torch.no_grad():
                logits = model(slide_batch)          # never the whole slide through the trunk
        """
        device = torch.device(tile_device) if tile_device is not None else None
        override = TrunkOverride(enabled=enabled, tile_size=tile_size, tile_device=device)
        with trunk_override(self, override):  # type: ignore[arg-type]
            yield

    def forward_trunk(self, x: Tensor) -> Tensor:
        """The trunk's output for ``x``: streamed under a streaming strategy, inside
        :meth:`streaming`, or without a Trainer when ``x`` is larger than a tile; else
        conventional."""
        trunk = self.streaming_split()[0]
        transform = self.streaming_transform()
        if transform is None:
            _check_float_input(type(self).__name__, x)
        override = _OVERRIDES.get().get(id(self))
        settings = self.streaming_settings
        if override is None and settings is not None:
            device = self._trainer.strategy.root_device  # type: ignore[attr-defined]
            return settings.stream(trunk, x, device, transform=transform, default_tile_size=self.default_tile_size)
        if override is None:
            tile = self.default_tile_size if self.default_tile_size is not None else DEFAULT_TILE_SIZE
            # Inside a running Trainer with another strategy: conventional, as chosen. Outside one
            # (none attached, or its run has finished): streamed where the input is larger than a tile.
            trainer = getattr(self, "_trainer", None)
            running = getattr(getattr(trainer, "state", None), "status", None) == "running"
            override = TrunkOverride(enabled=not running and _larger_than(x, tile), tile_size=tile)
        if not override.enabled:
            if is_region_source(x):  # a lazy input run conventionally is read whole, as a conventional run would
                x = x.read(tuple(slice(0, n) for n in x.shape[2:]))
            return trunk(x if transform is None else transform(x))
        return self._stream_trunk(trunk, x, transform, override)

    def _stream_trunk(self, trunk: nn.Module, x: Any, transform: Any, override: TrunkOverride) -> Any:
        tile: Any = override.tile_size
        options: dict[str, Any] = {} if override.keep_graphs is None else {"keep_graphs": override.keep_graphs}
        if tile is None and override.memory_budget is not None:
            tile, options["memory_budget"] = "auto", override.memory_budget
        elif tile is None:
            tile = self.default_tile_size if self.default_tile_size is not None else DEFAULT_TILE_SIZE
        device = override.tile_device
        if device is None:
            parameter = next(iter(trunk.parameters()), None)
            device = parameter.device if parameter is not None else None
        if device is not None and isinstance(x, Tensor) and x.device == device:
            device = None  # the core checks that input and trunk agree
        if override.capture is None:
            return stream(trunk, x, tile, tile_device=device, transform=transform, **options)
        with torch.no_grad():
            features = stream(trunk, x, tile, tile_device=device, transform=transform, **options)
        return override.capture(features)

    def forward(self, x: Tensor) -> Any:
        """``head(forward_trunk(x))``."""
        return self.streaming_split()[1](self.forward_trunk(x))

    # -- inference --------------------------------------------------------------------

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-image predictions with their identity, as a dict:

        - ``"slides"``: each image's slide path (a :class:`~lightning_streaming.SlideDataModule`
          batch), or its index in the dataset (plain tensors);
        - ``"probabilities"``: ``(N, classes)``, softmax (classification) or a sigmoid per
          class (multilabel); or ``"values"``: ``(N, targets)`` (regression);
        - ``"targets"``: the batch's targets, where it has them.

        Columns follow ``ls.model_info(self).classes``. A batch is an image tensor, an
        ``(images, targets)`` pair or a :class:`~lightning_streaming.SlideBatch`.
        """
        images, targets, slides = _unpack_batch(batch)
        if slides is None:
            slides = _batch_identities(self, batch_idx, dataloader_idx, _batch_size(images))
        outputs = self(images)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"{type(self).__name__}'s forward returned a {type(outputs).__name__}; the default predict_step "
                "needs one tensor of logits (N, classes) or values (N, targets). Override predict_step"
            )
        outputs = outputs.reshape(len(outputs), -1).detach()
        task = resolve_model_info(self).task
        result: dict[str, Any] = {"slides": list(slides)}
        if task == "regression":
            result["values"] = outputs
        else:
            result["probabilities"] = outputs.sigmoid() if task == "multilabel" else outputs.softmax(dim=1)
        if targets is not None:
            result["targets"] = targets
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record :func:`~lightning_streaming.model_info` in the checkpoint (plain data)."""
        checkpoint[CHECKPOINT_KEY] = resolve_model_info(self).to_dict()  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the record back into ``model_info``; restore a ``Uint8Normalize`` tile
        transform that the model's ``__init__`` did not rebuild."""
        record = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(record, Mapping):
            return
        info = ModelInfo.from_dict(record)
        self.model_info = info.merged(self.model_info or ModelInfo())
        if info.mean is None or info.std is None:
            return
        current = self.streaming_transform()
        if current is None:
            from ..data.normalize import Uint8Normalize

            self.tile_transform = Uint8Normalize(info.mean, info.std)
        elif transform_record(current) not in ((None, None), (info.mean, info.std)):
            import warnings

            warnings.warn(
                f"{type(self).__name__}'s tile_transform normalises with mean {transform_record(current)[0]} and "
                f"std {transform_record(current)[1]}, but its checkpoint was trained with mean {info.mean} and std "
                f"{info.std}; keeping the model's own. Build the model with the checkpoint's values",
                stacklevel=2,
            )


def _larger_than(x: Any, tile: TileSize) -> bool:
    """Whether ``x`` is a lazy source, or a tensor larger than one ``tile`` in some spatial dimension."""
    if is_region_source(x):
        return True
    if not isinstance(x, Tensor) or x.dim() < 3:
        return False
    spatial = tuple(x.shape[2:])
    tiles = (tile,) * len(spatial) if isinstance(tile, int) else tuple(tile)
    return any(n > t for n, t in zip(spatial, tiles))


def _unpack_batch(batch: Any) -> tuple[Any, Any, list[str] | None]:
    """``(images, targets or None, slide identities or None)`` of a predict batch."""
    slides = getattr(batch, "slides", None)
    if slides is not None and hasattr(batch, "images"):
        return batch.images, getattr(batch, "targets", None), [str(getattr(s, "path", s)) for s in slides]
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], targets, None
    if isinstance(batch, Mapping):
        for key in ("image", "images", "x", "input"):
            if key in batch:
                target = next((batch[k] for k in ("target", "targets", "label", "labels", "y") if k in batch), None)
                return batch[key], target, None
        raise TypeError(
            f"the default predict_step found no image in a batch with keys {sorted(batch)}: name it 'image' (or "
            "'images'), or override predict_step"
        )
    return batch, None, None


def _batch_size(images: Any) -> int:
    return int(images.shape[0]) if hasattr(images, "shape") else len(images)


def _batch_identities(model: Any, batch_idx: int, dataloader_idx: int, size: int) -> list[str]:
    """Dataset indices of the batch's samples (Lightning records them for predict loaders),
    else ``"batch:item"``."""
    trainer = getattr(model, "_trainer", None)
    try:
        loaders = trainer.predict_dataloaders  # type: ignore[union-attr]
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        indices = loader.batch_sampler.seen_batch_indices[batch_idx]
    except (AttributeError, IndexError, TypeError, KeyError):
        indices = None
    if isinstance(indices, (list, tuple)) and len(indices) == size and all(isinstance(i, int) for i in indices):
        return [str(i) for i in indices]
    return [f"{batch_idx}:{i}" for i in range(size)]


def _check_float_input(model: str, x: Any) -> None:
    """Refuse integer images without a ``tile_transform``, naming the model's fix (the core's
    message speaks of ``stream(transform=)``, which a Lightning user never calls)."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise TypeError(
            f"{model} got images of dtype {dtype}, but its trunk needs floating point and the model has no "
            "tile_transform. Set self.tile_transform = lightning_streaming.Uint8Normalize(mean, std) in "
            f"{model}.__init__ (mean and std per channel in [0, 1] units, e.g. from ls.channel_mean_std): each tile "
            "is then converted on its device and the float image never exists whole. Or make the DataLoader "
            "yield float images"
        )
