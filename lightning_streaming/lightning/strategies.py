"""The "streaming" and "streaming_ddp" strategies: Lightning's own, plus tile configuration.

Each is written once and built for ``lightning.pytorch`` and ``pytorch_lightning`` (see
:mod:`._compat`); nothing here imports Lightning until a variant is built.
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..core import expected_spatial_dims, geometry_of, tile_plan
from ._compat import LightningTyped, lightning_import
from .mixin import StreamingMixin
from .settings import DEFAULT_TILE_SIZE, StreamingSettings, TileSize

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from lightning_fabric.plugins import CheckpointIO
    from lightning_fabric.strategies import _StrategyRegistry
    from lightning_fabric.utilities.types import _DEVICE
    from pytorch_lightning.accelerators import Accelerator
    from pytorch_lightning.plugins.precision import Precision


class _StreamingParts:
    """What both streaming strategies add to their Lightning base: the settings, the check at
    the start of a run, and batch placement with ``input_on_host``."""

    streaming: StreamingSettings
    _lightning: Any  # the Lightning package of the variant (see LightningTyped)

    def _check_model(self, trainer: pl.Trainer) -> None:
        model = self.lightning_module  # type: ignore[attr-defined]
        _check_model(model, self.streaming, trainer.state.fn, self._lightning.__name__)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        if not self.streaming.input_on_host or _user_places_batches(self):
            return super().batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]
        device = device or self.root_device  # type: ignore[attr-defined]
        return _move_keeping_images(self, batch, device, dataloader_idx)


class StreamingStrategy(_StreamingParts, LightningTyped, lightning_base="strategies.SingleDeviceStrategy"):
    """Train on one device with the trunk of a :class:`~lightning_streaming.StreamingMixin`
    model streamed: run tile by tile, with exact gradients and a tile's working set of
    memory instead of the whole image's activations.

    Everything else is Lightning's :class:`~pytorch_lightning.strategies.SingleDeviceStrategy`.
    Selected by ``Trainer(strategy="streaming")`` (default settings) or by an instance.

    Args:
        tile_size: largest input region per tile in pixels, halo included: an int, a tuple
            with one int per spatial dimension, ``"auto"`` (chosen within
            ``memory_budget``), or None: the model's ``default_tile_size``, else 1024
            (with a ``memory_budget``: ``"auto"``).
        keep_graphs: number of tiles whose graphs the forward keeps for the backward,
            saving their recomputation at the cost of their activations' memory; None
            (default) uses :func:`~lightning_streaming.stream`'s default, or the
            planner's choice within a ``memory_budget``.
        memory_budget: the memory the streamed trunk may add to a step (its outputs and
            their gradients, parameter gradients, kept graphs and one trunk call's
            working set; see :func:`~lightning_streaming.stream`), an int or a string
            such as ``"4GiB"``. The planner then chooses the tile size (unless given),
            the kept graphs (unless given) and tile batching to minimise the step's
            predicted time, once per input shape (:func:`~lightning_streaming.stream_plan`
            shows its choice).
        input_on_host: keep image-shaped batch tensors (3 or more dimensions) where the
            DataLoader put them (host memory) and send the device one tile at a time;
            labels and other small tensors move as usual.
        device: the device to train on; None takes it from the Trainer's ``accelerator``
            and ``devices``.
        accelerator, checkpoint_io, precision_plugin: as for
            :class:`~pytorch_lightning.strategies.SingleDeviceStrategy`.

    Raises:
        ValueError: for an invalid ``tile_size``, ``keep_graphs`` or ``memory_budget``, or
            when the Trainer asks for more than one device.

    Example::

        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=2048), precision="bf16-mixed")
        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size="auto", memory_budget="8GiB"))
        trainer = pl.Trainer(strategy="streaming")
    """

    strategy_name = "streaming"

    def __init__(
        self,
        tile_size: TileSize | Literal["auto"] | None = None,
        *,
        keep_graphs: int | None = None,
        memory_budget: int | str | None = None,
        input_on_host: bool = False,
        device: _DEVICE | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.streaming = StreamingSettings(tile_size, keep_graphs, memory_budget, input_on_host)
        self._device_given = device is not None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The one device, once known. The Trainer fills it in from ``accelerator`` and
        ``devices`` when ``device`` was not given (SingleDeviceStrategy would stay on CPU)."""
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(
                f"StreamingStrategy runs on one device, but the Trainer was given {len(devices)} devices "
                f"({devices}); use strategy='streaming_ddp' (ls.StreamingDDPStrategy) for several, or devices=1"
            )
        self._root_device = torch.device(devices[0])
        self._device_given = True

    def setup(self, trainer: pl.Trainer) -> None:
        self._check_model(trainer)
        super().setup(trainer)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="Streaming on one device: the trunk of a StreamingMixin model runs tile by tile",
            override=True,
        )


class StreamingDDPStrategy(_StreamingParts, LightningTyped, lightning_base="strategies.DDPStrategy"):
    """Distributed data-parallel training with the trunk of a
    :class:`~lightning_streaming.StreamingMixin` model streamed in every process.

    Exact: the streamed trunk hands each parameter its gradient once per backward, so DDP's
    reducer sees one gradient per parameter and its ordinary bucketed all-reduce gives the
    same update as un-tiled DDP. Accumulation micro-steps skip the all-reduce through
    Lightning's usual ``no_sync``. Processes may see different image sizes and tile counts
    in the same step. The trunk's parameters are inputs of the streamed autograd function,
    so they count as used: ``find_unused_parameters=False`` (the default) and
    ``static_graph=True`` both work.

    Everything else is Lightning's :class:`~pytorch_lightning.strategies.DDPStrategy`,
    including multi-node launching through its cluster environments (torchrun, SLURM).
    Selected by ``Trainer(strategy="streaming_ddp")`` (launches processes by re-running the
    script, like ``"ddp"``), ``"streaming_ddp_spawn"`` (like ``"ddp_spawn"``), or an instance.

    Args:
        tile_size: as for :class:`~lightning_streaming.StreamingStrategy`.
        keep_graphs: as for :class:`~lightning_streaming.StreamingStrategy`.
        memory_budget: as for :class:`~lightning_streaming.StreamingStrategy`.
        input_on_host: as for :class:`~lightning_streaming.StreamingStrategy`.
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy`, e.g.
            ``start_method``, ``process_group_backend``, ``static_graph``,
            ``find_unused_parameters``, ``timeout``.

    Example::

        trainer = pl.Trainer(strategy="streaming_ddp", accelerator="gpu", devices=4)
        trainer = pl.Trainer(
            strategy=ls.StreamingDDPStrategy(tile_size=4096, static_graph=True), accelerator="gpu", devices=8
        )
    """

    strategy_name = "streaming_ddp"

    def __init__(
        self,
        tile_size: TileSize | Literal["auto"] | None = None,
        *,
        keep_graphs: int | None = None,
        memory_budget: int | str | None = None,
        input_on_host: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.streaming = StreamingSettings(tile_size, keep_graphs, memory_budget, input_on_host)

    def setup(self, trainer: pl.Trainer) -> None:
        # Before DDP wraps the model: a refused trunk fails here, in every process, not mid-epoch.
        self._check_model(trainer)
        if self._ddp_kwargs.get("static_graph") and trainer.accumulate_grad_batches > 1:
            lightning_import(self._lightning, "utilities.rank_zero").rank_zero_warn(
                "static_graph=True with accumulate_grad_batches > 1 fails in PyTorch's DDP, with or without "
                "streaming (an 'expect_autograd_hooks_' internal assert; pytorch/pytorch#143580). "
                "Set static_graph=False or accumulate_grad_batches=1"
            )
        super().setup(trainer)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self._process_group_backend == "gloo":
            # Lightning destroys an NCCL group at exit but leaves a gloo one alive, and gloo's threads still
            # running when the interpreter shuts down can abort the process (SIGABRT, "terminate called without
            # an active exception") after a successful fit, which the spawn launcher then reports as a crash.
            atexit.unregister(_leave_process_group)  # once, however many fits the process runs
            atexit.register(_leave_process_group)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in ((cls.strategy_name, "popen"), (f"{cls.strategy_name}_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"Streaming DDP (start_method '{start_method}'): the trunk is streamed in each process",
                override=True,
                start_method=start_method,
            )


def _leave_process_group() -> None:
    """Destroy this process's default process group, if it still exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _is_overridden(strategy: _StreamingParts, method: str, owner: Any) -> bool:
    """Lightning's ``is_overridden`` for a model or DataModule of the strategy's own package
    (the Trainer refuses objects of the other one)."""
    return lightning_import(strategy._lightning, "utilities.model_helpers").is_overridden(method, owner)


def _user_places_batches(strategy: _StreamingParts) -> bool:
    """Whether the model or its datamodule has its own ``transfer_batch_to_device`` hook:
    then that hook decides where tensors go, with or without ``input_on_host``."""
    model = strategy.lightning_module  # type: ignore[attr-defined]
    if model is None:
        return True
    datamodule = getattr(model._trainer, "datamodule", None)
    owners = [owner for owner in (model, datamodule) if owner is not None]
    return any(_is_overridden(strategy, "transfer_batch_to_device", owner) for owner in owners)


def _move_keeping_images(strategy: _StreamingParts, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
    """``batch_to_device`` with ``input_on_host``: image-shaped tensors stay on the host, the
    rest moves, then ``on_after_batch_transfer`` runs as Lightning would run it."""
    model = strategy.lightning_module  # type: ignore[attr-defined]
    assert model is not None
    move = lightning_import(strategy._lightning, "utilities").move_data_to_device
    batch = strategy.streaming.move_batch(batch, lambda t: move(t, device))
    datamodule = getattr(model._trainer, "datamodule", None)
    # Lightning prefers the datamodule's hook when both define one.
    datamodule_hook = datamodule is not None and _is_overridden(strategy, "on_after_batch_transfer", datamodule)
    owner = datamodule if datamodule_hook else model
    return owner.on_after_batch_transfer(batch, dataloader_idx)


def _spatial_dims(model: StreamingMixin, trunk: nn.Module) -> int:
    """Spatial dimensions of the model's input: from ``example_input_array``, else judged by
    the trunk's first 1d/2d/3d layer, else 2."""
    example = getattr(model, "example_input_array", None)
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if isinstance(example, Tensor) and example.dim() >= 3:
        return example.dim() - 2
    return expected_spatial_dims(trunk) or 2


def _check_model(
    model: pl.LightningModule | None, settings: StreamingSettings, stage: str | None, package: str
) -> None:
    """Refuse, at the start of a run, a model that cannot stream: not a StreamingMixin, no
    trunk, or a trunk with a non-local layer (NotLocalError names it); with an
    ``example_input_array``, also a tile too small for it (TileTooSmallError)."""
    if not isinstance(model, StreamingMixin):
        name = type(model).__name__
        raise TypeError(
            f"the streaming strategies stream the trunk of a StreamingMixin model, but {name} does not inherit it: "
            f"declare it as class {name}(lightning_streaming.StreamingMixin, {package}.LightningModule) "
            "with self.trunk and self.head, or use a non-streaming strategy"
        )
    trunk = model.streaming_split()[0]
    # Fitting runs the trunk in its current modes (Lightning 2 keeps them); the other stages run it in eval mode.
    modes = {m: m.training for m in trunk.modules()}
    if stage != "fit":  # Lightning's TrainerFn compares equal to its value
        trunk.eval()
    try:
        geometry_of(trunk, _spatial_dims(model, trunk))
        example = getattr(model, "example_input_array", None)
        example = example[0] if isinstance(example, (tuple, list)) and example else example
        if isinstance(example, Tensor) and not settings.planned:
            tile = settings.tile_size if settings.tile_size is not None else model.default_tile_size
            tile_plan(trunk, example.shape, tile if tile is not None else DEFAULT_TILE_SIZE)
    finally:
        for module, training in modes.items():
            module.training = training
