"""StreamingLSUV: layer-sequential unit-variance initialisation of a streamed trunk, per output channel."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor, nn

from ..core import ChannelMoments, channel_moments, trunk_layers
from ._compat import LightningTyped, lightning_import
from .channel_moments_metric import ChannelMomentsMetric
from .mixin import StreamingMixin

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

# A channel whose std is this small relative to its mean is constant (a dead channel, or a
# bias alone): float32 values cannot vary by less, so what is measured is rounding.
_CONSTANT = 1e-6


class StreamingLSUV(LightningTyped, lightning_base="callbacks.Callback"):
    """Layer-sequential unit-variance (LSUV) initialisation of the streamed trunk of a
    :class:`~lightning_streaming.StreamingMixin` model, per output channel, once at the
    start of training: the replacement for BatchNorm in the trunk used in the streaming
    paper (Pinckaers et al. 2020, section VII-A, after Mishkin & Matas 2016).

    Before the first training step it takes the first ``num_batches`` batches of the
    training dataloader (on every process: under DDP the statistics cover all processes'
    batches) and, layer by layer in the order the trunk runs them, measures each output
    channel's mean and standard deviation of the layer's output over all of those batches,
    then scales the channel's weights and bias by ``target_std / std``. It repeats for a
    layer until every channel's std is within ``tolerance`` of the target (a convolution's
    output is linear in its own weights, so this takes one rescaling; the second
    measurement confirms it) or ``max_iterations`` rescalings were made.

    The statistics are gathered while streaming when the Trainer's strategy is a streaming
    one: for each tile, count, sum and sum of squares per channel of the layer's output
    (float64, every output pixel counted exactly once, see
    :func:`~lightning_streaming.channel_moments`), summed over tiles, batches and processes
    (a torchmetrics state with ``dist_reduce_fx="sum"``), then
    ``std = sqrt(E[X^2] - mean^2)``. They equal those of the un-tiled activations. With any
    other strategy the layer's output is computed conventionally. Every process applies
    the same arithmetic to the same reduced sums, so all end with identical weights.

    The calibration images stay where the DataLoader put them (host memory) and reach the
    device tile by tile, through the model's ``tile_transform`` and the Trainer's precision
    (``convert_input`` and its forward context), as in training; Lightning's batch-transfer
    hooks are not applied. Fetching the batches leaves the random state untouched, so the
    training batches come in the same order with or without this callback. Sanity-check
    validation, if enabled, runs before it, on the initial weights.

    Resuming (``trainer.fit(..., ckpt_path=...)``) skips it: the checkpoint's weights are
    kept, and the callback's state in the checkpoint records that it ran. A second
    ``fit`` with the same callback also skips it.

    A per-layer table (channel-averaged std and mean before and after, rescalings; "before"
    is measured once the layers before it are initialised, as LSUV goes layer by layer) is
    shown on rank zero the way Lightning shows its model summary (INFO through Lightning's
    console logger, so it appears without configuring logging; ``verbose=False`` turns it
    off), stored in :attr:`report`, and sent
    to the Trainer's loggers as metrics ``lsuv/<layer>/std_before``, ``std_after``,
    ``mean_before``, ``mean_after`` and ``iterations`` (and as a table ``lsuv`` to loggers
    with ``log_table``, such as Weights & Biases).

    Args:
        num_batches: training batches per process to compute the statistics over (10 in
            the paper).
        target_std: the standard deviation every output channel of every chosen layer
            should have.
        tolerance: accepted relative deviation of each channel's std from ``target_std``
            (and, with ``center``, of its mean from 0, relative to ``target_std``).
        max_iterations: the most rescalings per layer; a layer still outside the tolerance
            after them is left as it is, with a warning.
        layers: qualified names of the trunk's convolutions to initialise (as in
            ``trunk.named_modules()``), processed in the order the trunk runs them; None:
            every convolution of the trunk (:func:`~lightning_streaming.trunk_layers`).
        center: also subtract each channel's mean through the layer's bias, so the
            output has mean 0 and std ``target_std`` per channel (the variant that uses
            the mean as well as the std). Off by default, as in the LSUV paper: it needs a
            bias in every chosen layer (ResNet-style convolutions have none), and a
            ReLU after a centred layer keeps half its inputs regardless.
        orthogonal_init: first replace each chosen layer's weights by an orthonormal
            matrix (:func:`torch.nn.init.orthogonal_` of the weight as ``(out, -1)``) and
            its bias by zeros, as in the LSUV paper. The random matrices are drawn from a
            seed that rank zero draws from its global generator (so
            :func:`~pytorch_lightning.seed_everything` makes them reproducible) and
            broadcasts, so every process draws the same.
        verbose: show the per-layer table (and a note when the callback is skipped) on the
            console.
        input_fn: returns the image from a training batch; by default the batch itself
            when it is a tensor, else its first element (``(x, y)`` batches).

    Raises:
        ValueError: in ``__init__`` for an invalid argument, in ``setup`` for a ``layers``
            name that is not a convolution of the trunk, or with ``center=True`` for a
            chosen layer without bias (naming them).
        TypeError: in ``setup`` when the model is not a StreamingMixin.
        FloatingPointError: when a layer's output is not finite on the calibration batches.

    Example::

        import pytorch_lightning as pl
        import lightning_streaming as ls

        lsuv = ls.StreamingLSUV(num_batches=10, target_std=1.0)
        trainer = pl.Trainer(strategy=ls.StreamingStrategy(tile_size=2048), callbacks=[lsuv])
        trainer.fit(model, datamodule)  # model: a StreamingMixin LightningModule
        for row in lsuv.report:
            print(row["layer"], row["std_before"], row["std_after"])
    """

    def __init__(
        self,
        num_batches: int = 10,
        target_std: float = 1.0,
        tolerance: float = 0.01,
        max_iterations: int = 10,
        layers: Sequence[str] | None = None,
        center: bool = False,
        orthogonal_init: bool = False,
        input_fn: Callable[[Any], Any] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not _positive_int(num_batches):
            raise ValueError(f"StreamingLSUV(num_batches=...) must be a positive int, got {num_batches!r}")
        if not _positive_int(max_iterations):
            raise ValueError(f"StreamingLSUV(max_iterations=...) must be a positive int, got {max_iterations!r}")
        if not _positive_float(target_std):
            raise ValueError(f"StreamingLSUV(target_std=...) must be a positive finite number, got {target_std!r}")
        if not _positive_float(tolerance) or tolerance >= 1:
            raise ValueError(
                f"StreamingLSUV(tolerance=...) must be a number in (0, 1), a relative deviation such as 0.01; "
                f"got {tolerance!r}"
            )
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(name, str) for name in layers) or not layers:
                raise ValueError(
                    f"StreamingLSUV(layers=...) must be None (every convolution of the trunk) or a non-empty list "
                    f"of qualified module names such as ['0', 'layer1.0.conv1']; got {layers!r}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"StreamingLSUV(layers=...) names a layer more than once: {list(layers)!r}")
        for name, value in (("center", center), ("orthogonal_init", orthogonal_init), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"StreamingLSUV({name}=...) must be True or False, got {value!r}")
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"StreamingLSUV(input_fn=...) must be a callable batch -> image or None, got {input_fn!r}")
        self.num_batches = num_batches
        self.target_std = float(target_std)
        self.tolerance = float(tolerance)
        self.max_iterations = max_iterations
        self.layers = list(layers) if layers is not None else None
        self.center = center
        self.orthogonal_init = orthogonal_init
        self.input_fn = input_fn if input_fn is not None else _default_input
        self.verbose = verbose
        self.report: list[dict[str, Any]] = []
        self._calibrated = False
        self._chosen: list[str] = []
        self._batches_note = ""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._chosen = self._resolve_layers(_trunk_of(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._calibrated or trainer.ckpt_path is not None:
            if _rank_zero():
                reason = "it already ran" if self._calibrated else f"resuming from {trainer.ckpt_path}"
                self._console().info("StreamingLSUV: skipped (%s); the weights are kept as they are", reason)
            self._calibrated = True
            return
        trunk = _trunk_of(pl_module)
        if self.orthogonal_init:
            self._orthogonalise(trainer, trunk)
        inputs = self._calibration_inputs(trainer)
        processes = f" on each of {trainer.world_size} processes" if trainer.world_size > 1 else ""
        self._batches_note = f"{len(inputs)} calibration batches{processes}"
        report = []
        with torch.no_grad():
            for name in self._chosen:
                report.append(self._calibrate_layer(trainer, pl_module, name, inputs))
        self.report = report
        self._calibrated = True
        self._log_report(trainer)

    def layer_moments(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: str, inputs: Sequence[Any]
    ) -> ChannelMoments:
        """Per-channel moments of ``layer``'s output over ``inputs`` (images as the model
        takes them), as this callback measures them: streamed when the strategy is a
        streaming one, else conventionally, summed over all processes (every process must
        call it, with the same ``layer``)."""
        trunk = _trunk_of(pl_module)
        assert isinstance(pl_module, StreamingMixin)
        module = trunk.get_submodule(layer)
        device = trainer.strategy.root_device
        metric = ChannelMomentsMetric(_out_channels(module)).to(device)
        settings = pl_module.streaming_settings
        transform = pl_module.streaming_transform()
        error: Exception | None = None
        try:
            with trainer.precision_plugin.forward_context():
                for x in inputs:
                    if settings is not None:
                        tile = settings.resolve_tile_size(trunk, x, device, pl_module.default_tile_size)
                        moments = channel_moments(
                            trunk, x, tile, layer, tile_device=device, transform=transform
                        )
                    else:
                        moments = _conventional_moments(trunk, module, x.to(device), transform)
                    metric.update(moments)
        except Exception as exc:  # the other processes must not wait for this one in the reduction
            error = exc
            metric.add_failure()
        try:
            return metric.compute()
        except RuntimeError:
            if error is not None:
                raise error from None
            raise

    def state_dict(self) -> dict[str, Any]:
        return {"calibrated": self._calibrated, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._calibrated = bool(state_dict.get("calibrated", False))
        self.report = list(state_dict.get("report", []))

    def _resolve_layers(self, trunk: nn.Module) -> list[str]:
        try:
            order = trunk_layers(trunk)
        except Exception as exc:
            if self.layers is None:
                raise ValueError(
                    f"StreamingLSUV could not list the trunk's convolutions ({type(exc).__name__}: {exc}); "
                    "pass layers=[...] with their qualified names in the order the trunk runs them"
                ) from exc
            order = None
        if self.layers is None:
            chosen = list(order or [])
        else:
            known = f"; the trunk's convolutions are: {order}" if order is not None else ""
            for name in self.layers:
                try:
                    module = trunk.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"StreamingLSUV(layers=...): the trunk has no submodule {name!r}{known}") from None
                if not isinstance(module, nn.modules.conv._ConvNd):
                    raise ValueError(
                        f"StreamingLSUV(layers=...) must name convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d); "
                        f"{name!r} is a {type(module).__name__}{known}"
                    )
                if order is not None and name not in order:
                    raise ValueError(f"StreamingLSUV(layers=...): the trunk does not run {name!r} (once){known}")
            chosen = [name for name in order if name in self.layers] if order is not None else list(self.layers)
        if not chosen:
            raise ValueError("StreamingLSUV found no convolution in the trunk to initialise")
        if self.center:
            no_bias = [name for name in chosen if trunk.get_submodule(name).bias is None]
            if no_bias:
                raise ValueError(
                    f"StreamingLSUV(center=True) subtracts each channel's mean through the layer's bias, but {no_bias} "
                    "have no bias: create them with bias=True, leave them out of layers=[...], or use center=False"
                )
        return chosen

    def _orthogonalise(self, trainer: pl.Trainer, trunk: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):  # reproducible under seed_everything, yet leaves the state as it was
            seed = int(torch.randint(0, 2**62, ()).item())
        seed = int(trainer.strategy.broadcast(seed, src=0))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in self._chosen:
                conv = trunk.get_submodule(name)
                weight = torch.empty(conv.weight.shape, dtype=torch.float64)
                nn.init.orthogonal_(weight, generator=generator)
                conv.weight.copy_(weight)
                if conv.bias is not None:
                    conv.bias.zero_()

    def _calibration_inputs(self, trainer: pl.Trainer) -> list[Any]:
        loaders = trainer.train_dataloader
        if loaders is None:
            raise RuntimeError("StreamingLSUV needs the training dataloader, but the Trainer has none")
        inputs = []
        with torch.random.fork_rng(devices=[]):  # leave the training data order as it would be
            combined = lightning_import(self._lightning, "utilities").CombinedLoader
            for batch, _, _ in combined(loaders, mode="max_size_cycle"):
                inputs.append(self.input_fn(trainer.precision_plugin.convert_input(batch)))
                if len(inputs) == self.num_batches:
                    break
        if not inputs:
            raise RuntimeError("StreamingLSUV: the training dataloader gave no batch to compute statistics on")
        if len(inputs) < self.num_batches and _rank_zero():
            log.warning(
                "StreamingLSUV: the training dataloader gave %d batches, fewer than num_batches=%d; using them",
                len(inputs),
                self.num_batches,
            )
        return inputs

    def _calibrate_layer(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, inputs: Sequence[Any]
    ) -> dict[str, Any]:
        conv = _trunk_of(pl_module).get_submodule(name)
        before = moments = self.layer_moments(trainer, pl_module, name, inputs)
        rescalings = 0
        while True:
            mean, std = moments.mean, moments.std
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise FloatingPointError(
                    f"StreamingLSUV: layer {name!r} has non-finite outputs on the calibration batches "
                    f"(std {std.tolist()}); the input or the layer's weights overflow"
                )
            constant = std <= _CONSTANT * mean.abs()
            converged = bool(((std / self.target_std - 1).abs() <= self.tolerance)[~constant].all())
            if self.center:
                converged = converged and bool((mean.abs() <= self.tolerance * self.target_std).all())
            if converged or rescalings == self.max_iterations:
                break
            scale = self.target_std / std.clamp_min(torch.finfo(std.dtype).tiny)
            scale = torch.where(constant, torch.ones_like(std), scale)
            _rescale_channels(conv, scale, mean if self.center else None)
            rescalings += 1
            moments = self.layer_moments(trainer, pl_module, name, inputs)
        if _rank_zero():
            if not converged:
                log.warning(
                    "StreamingLSUV: layer %r is still outside the tolerance after max_iterations=%d rescalings "
                    "(std %.4g to %.4g, target %g)",
                    name, rescalings, std[~constant].min().item() if (~constant).any() else float("nan"),
                    std[~constant].max().item() if (~constant).any() else float("nan"), self.target_std,
                )  # fmt: skip
            if constant.any():
                log.warning(
                    "StreamingLSUV: layer %r: %d of %d channels are constant on the calibration batches and were "
                    "left unscaled",
                    name, int(constant.sum()), constant.numel(),
                )  # fmt: skip
        return {
            "layer": name,
            "channels": int(std.numel()),
            "std_before": before.std.mean().item(),
            "std_before_min": before.std.min().item(),
            "std_before_max": before.std.max().item(),
            "mean_before": before.mean.mean().item(),
            "std_after": std.mean().item(),
            "std_after_min": std.min().item(),
            "std_after_max": std.max().item(),
            "mean_after": mean.mean().item(),
            "iterations": rescalings,
            "constant_channels": int(constant.sum()),
            "converged": converged,
        }

    def _console(self) -> logging.Logger:
        """Where the table goes: a child of the Lightning package's logger, which Lightning sets
        to show INFO on the console (as its model summary does), unless ``verbose=False``."""
        if not self.verbose:
            return log
        return logging.getLogger(f"{self._lightning.__name__}.lightning_streaming.lsuv")

    def _log_report(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        keys = ("std_before", "std_after", "mean_before", "mean_after", "iterations")
        metrics = {f"lsuv/{row['layer']}/{key}": float(row[key]) for row in self.report for key in keys}
        columns = ["layer", "channels", *keys]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if callable(getattr(logger, "log_table", None)):
                logger.log_table(key="lsuv", columns=columns, data=[[row[c] for c in columns] for row in self.report])
        width = max(len("layer"), *(len(row["layer"]) for row in self.report))
        lines = [
            f"{'layer':<{width}}  channels  {'std before [min, max]':<28}  {'std after [min, max]':<28}  "
            "mean before  mean after  iterations"
        ]
        for row in self.report:
            before = f"{row['std_before']:.4g} [{row['std_before_min']:.4g}, {row['std_before_max']:.4g}]"
            after = f"{row['std_after']:.4f} [{row['std_after_min']:.4f}, {row['std_after_max']:.4f}]"
            lines.append(
                f"{row['layer']:<{width}}  {row['channels']:>8}  {before:<28}  {after:<28}  "
                f"{row['mean_before']:>11.4g}  {row['mean_after']:>10.4g}  {row['iterations']:>10}"
            )
        self._console().info(
            "StreamingLSUV: per-channel std %g in %d layers, over %s\n%s",
            self.target_std, len(self.report), self._batches_note, "\n".join(lines),
        )  # fmt: skip


def _rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0  # Lightning sets the rank once it knows it


def _trunk_of(pl_module: pl.LightningModule) -> nn.Module:
    if not isinstance(pl_module, StreamingMixin):
        name = type(pl_module).__name__
        raise TypeError(
            f"StreamingLSUV initialises the trunk of a StreamingMixin model, but {name} does not inherit it: declare "
            f"class {name}(lightning_streaming.StreamingMixin, LightningModule) with self.trunk"
        )
    return pl_module.streaming_split()[0]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _default_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        raise TypeError(
            f"StreamingLSUV cannot tell which entry of a dict batch (keys {list(batch)}) is the image: pass "
            "input_fn, e.g. StreamingLSUV(input_fn=lambda batch: batch['image'])"
        )
    return batch


def _out_channels(conv: nn.Module) -> int:
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise ValueError(f"StreamingLSUV initialises convolutions, not {type(conv).__name__}")
    return conv.out_channels


def _conventional_moments(
    trunk: nn.Module, layer: nn.Module, x: Tensor, transform: Callable[[Tensor], Tensor] | None
) -> ChannelMoments:
    """The moments of ``layer``'s output in an ordinary forward of the whole trunk."""
    captured: list[ChannelMoments] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(ChannelMoments.of(output)))
    try:
        trunk(x if transform is None else transform(x))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"StreamingLSUV: the trunk ran the layer {layer!r} {len(captured)} times, not once")
    return captured[0]


def _rescale_channels(conv: nn.modules.conv._ConvNd, scale: Tensor, mean: Tensor | None) -> None:
    """Multiply each output channel of ``conv`` by ``scale`` (weights and bias); with
    ``mean``, also subtract ``scale * mean`` from the bias, centring the channel."""
    weight = conv.weight
    s = scale.to(weight.device, weight.dtype)
    spatial = (1,) * (weight.dim() - 2)
    if conv.transposed:  # (in, out / groups, *kernel): output channel g * out/groups + j is [group g rows, j]
        weight.unflatten(0, (conv.groups, -1)).mul_(s.view(conv.groups, 1, -1, *spatial))
    else:  # (out, in / groups, *kernel)
        weight.mul_(s.view(-1, 1, *spatial))
    if conv.bias is not None:
        if mean is not None:
            conv.bias.copy_(((conv.bias.to(scale.dtype) - mean.to(scale)) * scale).to(conv.bias))
        else:
            conv.bias.mul_(s)
