"""The streamed computation: tiled forward under no_grad, tiled recompute-and-backward."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .batching import batch_mixing
from .budget import parse_bytes, plan_for_budget
from .chain import split_modules
from .schedule import StreamPlan, explicit_plan, format_bytes
from .speed import device_speed
from .graph import TrunkGeometry, geometry_of
from .plan import Segment, TilePlan, normalise_tile_size, plan_tiles
from .source import RegionSource, is_region_source
from .tracing import TraceInputError, expected_spatial_dims

log = logging.getLogger(__name__)
Tile = tuple[Segment, ...]
_MAX_PLANS_PER_TRUNK = 64


def _region_index(tile: Tile) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(s.start, s.stop) for s in tile)


def _output_index(tile: Tile, k: int) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(s.outputs[k][0], s.outputs[k][1]) for s in tile)


def _crop_index(tile: Tile, k: int) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(
        slice(s.outputs[k][0] - s.outputs[k][2], s.outputs[k][1] - s.outputs[k][2]) for s in tile
    )


Kept = dict[int, tuple[dict[str, Tensor], Tensor, list[list[Tensor]]]]


class _TileRunner:
    """Runs the trunk on the tiles of one plan, one trunk call per run of tiles (equal
    region shapes, concatenated along the batch); shared by the forward and the backward."""

    def __init__(
        self,
        module: nn.Module,
        plan: TilePlan,
        params: list[Tensor],
        device: torch.device,
        transform: Callable[[Tensor], Tensor] | None,
        runs: Sequence[Sequence[int]] | None = None,
    ):
        self.module, self.plan, self.params = module, plan, params
        self.param_names = _parameter_names(module, params)
        self.device, self.transform = device, transform
        self.tiles = list(plan)
        self.runs = [tuple(run) for run in runs] if runs is not None else [(i,) for i in range(len(self.tiles))]
        self.outputs = len(plan.output_shapes)
        self.autocast = (
            device.type,
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )

    def run(self, region: Tensor, tile: Tile, aliases: dict[str, Tensor] | None = None) -> list[Tensor]:
        """The trunk's exact outputs on ``tile``'s output boxes; with ``aliases``, computed
        with those stand-ins for the parameters."""
        return self.run_batch(region, [tile], aliases)[0]

    def run_batch(
        self, region: Tensor, tiles: Sequence[Tile], aliases: dict[str, Tensor] | None = None
    ) -> list[list[Tensor]]:
        """Per tile, the trunk's exact outputs on its output boxes, from one call on
        ``region``: the tiles' regions (of equal shape) concatenated along the batch."""
        inputs = region if self.transform is None else self.transform(region)
        if aliases is None:
            out = self.module(inputs)
        else:
            out = torch.func.functional_call(self.module, aliases, (inputs,))
        leaves = pytree.tree_leaves(out)
        if len(leaves) != self.outputs:
            raise RuntimeError(f"the trunk returned {len(leaves)} feature maps on a tile, {self.outputs} when analysed")
        per_tile: list[list[Tensor]] = [[] for _ in tiles]
        for k, leaf in enumerate(leaves):
            # The trunk treats the images of a batch independently (checked before batching), so
            # its output splits back into each tile's images.
            images = leaf.shape[0] // len(tiles)
            for i, tile in enumerate(tiles):
                part = leaf if len(tiles) == 1 else leaf[i * images : (i + 1) * images]
                crop = part[_crop_index(tile, k)]
                expected = tuple(s.outputs[k][1] - s.outputs[k][0] for s in tile)
                if tuple(crop.shape[2:]) != expected:
                    raise RuntimeError(
                        f"internal error: a tile's output {k} has shape {tuple(part.shape)}, which does not cover the "
                        f"planned box {expected}; please report this with the trunk's definition"
                    )
                per_tile[i].append(crop)
        return per_tile

    def aliases(self) -> dict[str, Tensor]:
        """Detached stand-ins for the trainable parameters. A tile's graph ends at these, not
        at the parameters, so per-tile backward passes fire no parameter hooks (DDP's
        among them); the summed gradient reaches the parameters once, through autograd."""
        return {name: p.detach().requires_grad_() for name, p in zip(self.param_names, self.params)}

    def read(self, x: Tensor | RegionSource, tile: Tile) -> Tensor:
        if isinstance(x, Tensor):
            region = x[_region_index(tile)]
        else:
            region = x.read(_region_index(tile)[2:])
            expected = tuple(x.shape[:2]) + tuple(s.size for s in tile)
            if not isinstance(region, Tensor) or tuple(region.shape) != expected:
                got = tuple(region.shape) if isinstance(region, Tensor) else type(region).__name__
                raise ValueError(
                    f"{type(x).__name__}.read({_region_index(tile)[2:]}) returned {got}, expected a tensor of shape "
                    f"{expected} (N, C, *region)"
                )
        return region.to(self.device, non_blocking=True)

    def read_run(self, x: Tensor | RegionSource, run: Sequence[int]) -> Tensor:
        """The regions of a run's tiles, one after another along the batch."""
        regions = [self.read(x, self.tiles[i]) for i in run]
        return regions[0] if len(regions) == 1 else torch.cat(regions)

    def forward(self, x: Tensor | RegionSource, kept_runs: int = 0, requires_input_grad: bool = False):
        """Tiled forward. The graphs of the last ``kept_runs`` runs are kept (the backward
        visits them first), the rest run under no_grad."""
        outputs: list[Tensor] | None = None
        kept: Kept = {}
        first_kept = len(self.runs) - kept_runs
        for index, run in enumerate(self.runs):
            tiles = [self.tiles[i] for i in run]
            region = self.read_run(x, run)
            if index >= first_kept:
                with torch.enable_grad():
                    aliases = self.aliases()
                    region = region.detach().requires_grad_(requires_input_grad)
                    crops = self.run_batch(region, tiles, aliases)
                kept[index] = (aliases, region, crops)
            else:
                with torch.no_grad():
                    crops = self.run_batch(region, tiles)
            if outputs is None:
                outputs = [
                    torch.empty(tuple(c.shape[:2]) + shape, dtype=c.dtype, device=c.device)
                    for c, shape in zip(crops[0], self.plan.output_shapes)
                ]
            for tile, tile_crops in zip(tiles, crops):
                for k, crop in enumerate(tile_crops):
                    outputs[k][_output_index(tile, k)] = crop.detach()
        assert outputs is not None
        return outputs, kept

    def backward(
        self,
        x: Tensor | RegionSource,
        grad_outputs: Sequence[Tensor | None],
        kept: Kept,
        needs_param_grad: Sequence[bool],
        needs_input_grad: bool,
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """Recompute each run with grad and backpropagate its tiles' slices of
        ``grad_outputs``; sum the parameter gradients locally so each parameter gets one
        gradient."""
        wanted = [name for name, need in zip(self.param_names, needs_param_grad) if need]
        sums: list[Tensor | None] = [None] * len(wanted)
        grad_input = torch.zeros_like(x) if needs_input_grad else None
        device_type, enabled, dtype = self.autocast
        for index in reversed(range(len(self.runs))):
            run = self.runs[index]
            tiles = [self.tiles[i] for i in run]
            if index in kept:
                aliases, region, crops = kept.pop(index)
            else:
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    aliases = self.aliases()
                    region = self.read_run(x, run).detach().requires_grad_(needs_input_grad)
                    crops = self.run_batch(region, tiles, aliases)
            pairs = [
                (crop, grad[_output_index(tile, k)])
                for tile, tile_crops in zip(tiles, crops)
                for k, (crop, grad) in enumerate(zip(tile_crops, grad_outputs))
                if grad is not None and crop.requires_grad and crop.numel()
            ]
            inputs = [aliases[name] for name in wanted] + ([region] if needs_input_grad else [])
            if not inputs or not pairs:
                continue
            grads = torch.autograd.grad([c for c, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
            for i, grad in enumerate(grads[: len(wanted)]):
                if grad is not None:
                    sums[i] = grad if sums[i] is None else sums[i].add_(grad)
            if needs_input_grad and grads[-1] is not None:
                images = grads[-1].shape[0] // len(tiles)
                for i, tile in enumerate(tiles):
                    part = grads[-1][i * images : (i + 1) * images]
                    grad_input[_region_index(tile)] += part.to(grad_input.device)
            del crops, region, grads, aliases, pairs
        result: list[Tensor | None] = []
        found = iter(sums)
        for param, need in zip(self.params, needs_param_grad):
            grad = next(found) if need else None
            result.append(torch.zeros_like(param) if need and grad is None else grad)
        return grad_input, result


class _StreamFunction(torch.autograd.Function):
    """Trunk parameters are explicit inputs, so each gets its gradient once per backward."""

    @staticmethod
    def forward(ctx, runner: _TileRunner, kept_runs: int, x: Tensor, *params: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        outputs, kept = runner.forward(x, kept_runs, requires_input_grad=ctx.needs_input_grad[2])
        ctx.runner, ctx.kept = runner, kept
        if isinstance(x, Tensor):
            ctx.save_for_backward(x)
        else:
            ctx.source = x
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):  # type: ignore[override]
        if torch.is_grad_enabled():
            # A silent first-order answer would be wrong for gradient penalties and the like.
            raise RuntimeError(
                "stream() does not support double backward (create_graph=True): the tiles are recomputed "
                "inside the backward. Compute higher-order gradients with the trunk run conventionally"
            )
        x = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.source
        grad_input, grad_params = ctx.runner.backward(
            x, grad_outputs, ctx.kept, ctx.needs_input_grad[3:], ctx.needs_input_grad[2]
        )
        ctx.kept = {}
        return (None, None, grad_input, *grad_params)


def _parameter_names(module: nn.Module, params: list[Tensor]) -> list[str]:
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for p in params]


def _trunk_device(module: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return fallback


def _check_input(
    module: nn.Module, x: Tensor | RegionSource, device: torch.device, tile_device_given: bool, transform
) -> None:
    source = is_region_source(x)
    if not isinstance(x, Tensor) and not source:
        raise TypeError(
            f"stream() needs a tensor of shape (N, C, *spatial) or a RegionSource, got {type(x).__name__}"
        )
    if len(x.shape) < 3 or len(x.shape) > 5:
        raise ValueError(
            f"stream() needs a batched input of shape (N, C, L), (N, C, H, W) or (N, C, D, H, W); got shape "
            f"{tuple(x.shape)}. Add a batch dimension with x.unsqueeze(0)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"tiles are to run on {device}, but CUDA is not available on this machine (torch.cuda.is_available() "
            "is False); pass tile_device='cpu' (or leave it None to use the trunk's device), or install a CUDA build "
            "of PyTorch on a machine with a GPU"
        )
    if not source and x.device != device and not tile_device_given:
        raise ValueError(
            f"the input is on {x.device} but the trunk's parameters are on {device}; move one of them, or pass "
            f"tile_device={str(device)!r} to keep the image where it is and send tiles to the trunk one by one"
        )
    param = next(iter(module.parameters()), None)
    if transform is None and not x.dtype.is_floating_point:
        raise TypeError(
            f"the input has dtype {x.dtype}; the trunk needs floating point. Pass transform= (for example a "
            "per-pixel normalisation) to convert each tile, so the full float image never exists"
        )
    if (
        transform is None
        and param is not None
        and param.is_floating_point()
        and x.dtype != param.dtype
        and not torch.is_autocast_enabled(device.type)
    ):
        raise TypeError(
            f"the input has dtype {x.dtype} but the trunk's parameters have dtype {param.dtype}; cast one of them "
            "(x.to(dtype) or trunk.to(dtype)), or run under torch.autocast for mixed precision"
        )


def _geometry_for(module: nn.Module, input_shape: Sequence[int]) -> TrunkGeometry:
    """The trunk's geometry for inputs of ``input_shape``, with messages that say what is
    wrong with the input when the trunk cannot take it."""
    spatial_dims = len(input_shape) - 2
    spatial = tuple(int(s) for s in input_shape[2:])
    try:
        geometry = geometry_of(module, spatial_dims, int(input_shape[1]))
        if geometry.conditions and any(geometry.lengths(d, n) is None for d, n in enumerate(spatial)):
            # The trunk's own code takes another path at this image's size: analyse it at this size.
            at_size = geometry_of(module, spatial_dims, int(input_shape[1]), hints=spatial)
            if all(at_size.lengths(d, n) is not None for d, n in enumerate(spatial)):
                return at_size
        return geometry
    except (TraceInputError, ValueError) as error:
        expected = expected_spatial_dims(module)
        if expected is not None and expected != spatial_dims:
            layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[expected]
            hint = (
                " Add a batch dimension with x.unsqueeze(0)"
                if len(input_shape) == expected + 1
                else ""
            )
            raise ValueError(
                f"the trunk's layers work on {expected} spatial dimension(s), so its input must be {layout}, but the "
                f"input has shape {tuple(input_shape)}.{hint}"
            ) from error
        if isinstance(error, TraceInputError):
            channels = error.expected_channels
            hint = ""
            if channels is not None and int(input_shape[-1]) == channels:
                order = "(0, 3, 1, 2)" if len(input_shape) == 4 else "(0, 2, 1)" if len(input_shape) == 3 else (
                    "(0, 4, 1, 2, 3)"
                )
                hint = f"; it looks channels-last (N, *spatial, C): pass x.permute{order}"
            raise ValueError(f"{error} (input shape {tuple(input_shape)}){hint}") from None
        raise


def tile_plan(module: nn.Module, input_shape: Sequence[int], tile_size: int | Sequence[int]) -> TilePlan:
    """The :class:`TilePlan` that :func:`stream` uses for an input of ``input_shape``
    (``(N, C, *spatial)``), without running anything."""
    geometry = _geometry_for(module, input_shape)
    spatial = tuple(int(s) for s in input_shape[2:])
    return _cached_plan(geometry, spatial, normalise_tile_size(tile_size, len(spatial)))


def _cached_plan(geometry: TrunkGeometry, spatial: tuple[int, ...], tiles: tuple[int, ...]) -> TilePlan:
    plans = geometry.__dict__.setdefault("_plans", {})
    key = (spatial, tiles)
    if key not in plans:
        if len(plans) >= _MAX_PLANS_PER_TRUNK:
            plans.pop(next(iter(plans)))
        plans[key] = plan_tiles(geometry, spatial, tiles)
    return plans[key]


def input_gradients(
    module: nn.Module,
    input: Tensor | RegionSource,
    tile_size: int | Sequence[int],
    grad_outputs: Any,
    *,
    tile_device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[tuple[tuple[slice, ...], Tensor]]:
    """The gradient of ``sum(grad_outputs * module(input))`` with respect to the input,
    one tile at a time: yields ``(region, gradient)`` for each tile in raster order (the
    last spatial dimension fastest), where ``region`` is the tile's input box (one slice
    per spatial dimension) and ``gradient`` the ``(N, C, *region)`` gradient of the tile's
    share of the outputs with respect to its region.

    The input gradient is the sum of the yielded gradients over their regions (regions
    overlap by the halo), so it need never exist whole: a caller reduces it as it goes
    (e.g. saliency maps of a gigapixel slide). With ``transform``, the gradient is with
    respect to the transformed region (e.g. the normalised pixels of a uint8 image).
    Parameters receive no gradient.

    Args:
        grad_outputs: gradients of the trunk's outputs, in the structure the trunk
            returns (one tensor for a single feature map); None for an output that does
            not contribute.
    """
    if tile_device is not None:
        device = torch.device(tile_device)
    else:
        device = _trunk_device(module, input.device if isinstance(input, Tensor) else torch.device("cpu"))
    _check_input(module, input, device, tile_device is not None, transform)
    geometry = _geometry_for(module, input.shape)
    spatial = tuple(int(s) for s in input.shape[2:])
    plan = _cached_plan(geometry, spatial, normalise_tile_size(tile_size, len(spatial)))
    runner = _TileRunner(module, plan, [], device, None)
    grads = pytree.tree_leaves(grad_outputs, is_leaf=lambda g: g is None)
    if len(grads) != len(plan.output_shapes):
        raise ValueError(f"grad_outputs has {len(grads)} tensors but the trunk returns {len(plan.output_shapes)}")
    for tile in runner.tiles:
        region = runner.read(input, tile)
        with torch.enable_grad():
            pixels = (region if transform is None else transform(region)).detach().requires_grad_()
            crops = runner.run(pixels, tile)
            pairs = [
                (crop, grad[_output_index(tile, k)].to(crop.device))
                for k, (crop, grad) in enumerate(zip(crops, grads))
                if grad is not None and crop.numel()
            ]
            if pairs and any(c.requires_grad for c, _ in pairs):
                (gradient,) = torch.autograd.grad([c for c, _ in pairs], [pixels], [g for _, g in pairs])
            else:
                gradient = torch.zeros_like(pixels)
        yield _region_index(tile)[2:], gradient
        del crops, pairs, pixels, gradient


def stream(
    module: nn.Module,
    input: Tensor | RegionSource,
    tile_size: int | Sequence[int] | Literal["auto"] = "auto",
    *,
    keep_graphs: int | None = None,
    memory_budget: int | str | None = None,
    tile_batch: int | None = None,
    tile_device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Any:
    """Compute ``module(input)`` tile by tile, with the same values and gradients.

    The trunk's outputs are split into a balanced grid of disjoint tiles. For each tile the
    trunk runs, under ``no_grad``, on the input region that tile's receptive field covers
    (its start aligned to the trunk's pixel grids, so every strided or resizing layer sees
    the image's grid), and the exact part of its outputs is written into the full outputs.
    On backward each tile is recomputed with grad and its slices of the output gradients
    are backpropagated; per-tile parameter gradients are summed locally and returned once,
    as for any autograd function input, so hooks, gradient accumulation and DDP behave
    as for a conventional module.

    What is exact: every output, the gradient of every trainable parameter of ``module``
    (any batch size), and the input gradient when ``input.requires_grad``; all equal the
    un-tiled computation up to floating-point summation order. A trunk may return one
    feature map or a tuple, list or dict of them (e.g. FPN levels); ``stream`` returns the
    same structure, and the tiles partition every output.

    What is accepted: any trunk whose PyTorch operations are local, however they are
    written (convolutions and transposed convolutions, pooling, padding and cropping,
    integer up- and downsampling, pixel shuffle, eval-mode norms, pixel-wise and
    per-pixel channel operations including reshapes, permutes and splits of channels,
    residual and skip connections between feature maps on the same pixel grid). The trunk
    is analysed once per structure by running it on fake tensors with symbolic sizes
    (forward hooks on its modules run then too, and see those fake tensors).

    What is refused, with an error naming the module, the line of code and the fix
    (:class:`NotLocalError`): any operation that is not local or not deterministic:
    BatchNorm/InstanceNorm in training mode, GroupNorm, global or adaptive pooling and
    other reductions over space, attention, Dropout or stochastic depth in training mode,
    circular padding, padding or positions computed from the feature map's size, and
    operators without a rule. A tile that cannot hold one output pixel's receptive field
    raises :class:`TileTooSmallError` stating the minimum usable tile.

    Cost: memory holds the input (where it lives), the outputs, the output gradients and
    one tile's activations; no activation of the full image is ever held. Time is one
    extra forward of the trunk (for all tiles but the kept ones) plus the overlap (halo)
    between tiles. ``keep_graphs=k`` keeps the graphs of the last ``k`` tiles from the
    forward, so the backward, which visits them first, need not recompute them. The
    default, 1, costs no extra peak memory (the backward holds one tile's graph anyway)
    and removes the recomputation entirely when the image fits in one tile; each further
    kept tile costs one tile's activations and saves one tile's recomputation.
    ``tile_batch=b`` runs up to ``b`` tiles of equal region shape as one batch (one trunk
    call, in the forward, the recompute and the backward): fewer, larger calls, which
    fill a GPU better, for ``b`` tiles' activations at once. It is exact for trunks that
    treat the images of a batch independently, which is checked (the trunk is analysed
    once more with the batch as a dimension); batching a trunk that mixes them raises.

    With ``memory_budget``, the choice is made for you: the fastest plan whose predicted
    memory fits the budget, by a cost model of the trunk on this device (see
    :func:`stream_plan`, which shows the plan, and
    :mod:`lightning_streaming.core.budget`). The budget is the memory the streamed trunk
    adds to a step: its outputs and their gradients, the parameter gradients being summed
    (twice the trainable parameters), the input gradient when the input requires grad,
    the kept graphs and the working set of the trunk call being run; not the input itself,
    the parameters, the head or the optimizer. ``tile_size="auto"`` lets the planner
    choose the tile size too, and for a plain ``nn.Sequential`` trunk it may stream only
    its first children and run the rest whole on their (low-resolution) output, which
    keeps the halo of the streamed part small; an explicit ``tile_size``, ``keep_graphs``
    or ``tile_batch`` is kept and the rest chosen around it. The plan is made once per
    input shape and settings, and logged (INFO) when made.

    Args:
        module: the trunk, a module of local operations mapping (N, C, *spatial) to
            (N, C', *spatial') (or a structure of such maps), with 1, 2 or 3 spatial
            dimensions.
        input: the image batch, (N, C, *spatial), of any spatial size: a tensor, or a
            :class:`RegionSource` that reads each tile's region on demand, so the image
            is never held whole (no input gradient then).
        tile_size: largest input region per tile in pixels, halo included: an int for
            every dimension or one per spatial dimension; or ``"auto"`` (the default),
            chosen within ``memory_budget``, which it then needs.
        keep_graphs: number of tiles whose graphs the forward keeps for the backward
            (default 1, or the planner's choice with a budget; 0 for the smallest memory
            while the head runs).
        memory_budget: bytes (an int, or a string such as ``"4GiB"``) the streamed trunk
            may add to a step; the planner chooses what is not given explicitly.
        tile_batch: most tiles of equal shape per trunk call (default 1, or the planner's
            choice with a budget).
        tile_device: device to run tiles on when the input lives elsewhere (e.g. a
            host-resident image streamed to the GPU); defaults to the trunk's device.
        transform: per-pixel function applied to each tile before the trunk (e.g.
            normalising a uint8 image), so the full float image never exists. It must be
            pixel-wise: it is not analysed.

    Returns:
        ``module(input)``, computed tile by tile.
    """
    device = _tile_device(module, input, tile_device)
    _check_input(module, input, device, tile_device is not None, transform)
    geometry = _geometry_for(module, input.shape)
    requires_grad = bool(getattr(input, "requires_grad", False))  # a RegionSource has no gradient
    grad = torch.is_grad_enabled() and (requires_grad or any(p.requires_grad for p in module.parameters()))
    plan = _plan(
        module, geometry, input.shape, tile_size, keep_graphs, memory_budget, tile_batch, grad, requires_grad,
        input.dtype, _activation_dtype(device), device,
    )  # fmt: skip
    if plan.split is not None:  # the first children streamed, the rest run whole on their small output
        streamed, rest = split_modules(module, plan.split[0])
        return rest(_run(streamed, input, plan, device, transform)[0])
    return pytree.tree_unflatten(_run(module, input, plan, device, transform), geometry.output_spec)


def _run(
    module: nn.Module, input: Tensor | RegionSource, plan: StreamPlan, device: torch.device,
    transform: Callable[[Tensor], Tensor] | None,
) -> list[Tensor]:  # fmt: skip
    """``module``'s outputs on ``input``, tile by tile as ``plan`` says."""
    params = [p for p in module.parameters() if p.requires_grad]
    runner = _TileRunner(module, plan.tiles, params, device, transform, plan.runs)
    if not torch.is_grad_enabled() or not (getattr(input, "requires_grad", False) or params):
        with torch.no_grad():
            return runner.forward(input)[0]
    return list(_StreamFunction.apply(runner, plan.kept_runs, input, *params))


def stream_plan(
    module: nn.Module,
    input_shape: Sequence[int],
    tile_size: int | Sequence[int] | Literal["auto"] = "auto",
    *,
    keep_graphs: int | None = None,
    memory_budget: int | str | None = None,
    tile_batch: int | None = None,
    grad: bool = True,
    input_grad: bool = False,
    input_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> StreamPlan:
    """The :class:`StreamPlan` that :func:`stream` follows for an input of ``input_shape``
    (``(N, C, *spatial)``) with these settings, without running anything: the tile grid,
    the trunk calls (tiles batched together), the kept graphs and, with a
    ``memory_budget``, the predicted memory and time.

    ``grad``: a training step (False: a forward without grad, e.g. inference);
    ``input_grad``: the input requires grad; ``activation_dtype``: the autocast dtype under
    mixed precision; ``device``: where the tiles run (default: the trunk's device).

    Example::

        plan = ls.stream_plan(trunk, (1, 3, 8192, 8192), memory_budget="4GiB")
        print(plan)  # tile size, grid, calls, kept graphs, predicted memory and time
    """
    device = torch.device(device) if device is not None else _trunk_device(module, torch.device("cpu"))
    geometry = _geometry_for(module, input_shape)
    return _plan(
        module, geometry, input_shape, tile_size, keep_graphs, memory_budget, tile_batch, grad, input_grad,
        input_dtype, activation_dtype, device,
    )  # fmt: skip


def _tile_device(
    module: nn.Module, input: Tensor | RegionSource, tile_device: torch.device | str | None
) -> torch.device:
    if tile_device is not None:
        return torch.device(tile_device)
    return _trunk_device(module, input.device if isinstance(input, Tensor) else torch.device("cpu"))


def _activation_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _check_settings(tile_size: Any, keep_graphs: Any, memory_budget: Any, tile_batch: Any) -> None:
    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if keep_graphs is not None and not count(keep_graphs, 0):
        raise ValueError(
            f"keep_graphs must be a non-negative int (the number of tiles whose graphs the forward keeps), "
            f"got {keep_graphs!r}"
        )
    if tile_batch is not None and not count(tile_batch, 1):
        raise ValueError(f"tile_batch must be a positive int (the most tiles one trunk call runs), got {tile_batch!r}")
    if tile_size == "auto" and memory_budget is None:
        raise ValueError(
            "tile_size='auto' needs memory_budget: the memory the streamed trunk may add to a step, e.g. "
            "memory_budget='4GiB'. Or give tile_size as an int"
        )


def _plan(
    module: nn.Module, geometry: TrunkGeometry, input_shape: Sequence[int], tile_size: Any, keep_graphs: int | None,
    memory_budget: int | str | None, tile_batch: int | None, grad: bool, input_grad: bool, input_dtype: torch.dtype,
    activation_dtype: torch.dtype | None, device: torch.device,
) -> StreamPlan:  # fmt: skip
    """The plan of explicit settings, or the budget planner's (cached per input and settings)."""
    _check_settings(tile_size, keep_graphs, memory_budget, tile_batch)
    spatial = tuple(int(s) for s in input_shape[2:])
    tiles = None if tile_size == "auto" else normalise_tile_size(tile_size, len(spatial))
    if memory_budget is None:
        assert tiles is not None
        if tile_batch is not None and tile_batch > 1:
            mixing = batch_mixing(module, geometry, int(input_shape[1]))
            if mixing is not None:
                raise ValueError(f"tile_batch={tile_batch} runs tiles as one batch, which is not exact here: {mixing}")
        keep = 1 if keep_graphs is None else keep_graphs
        return explicit_plan(_cached_plan(geometry, spatial, tiles), keep, tile_batch or 1, grad)
    budget = parse_bytes(memory_budget)
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    speed = device_speed(device, activation_dtype or (param.dtype if param is not None else torch.float32))
    key = (tuple(int(s) for s in input_shape), tiles, keep_graphs, budget, tile_batch, grad, input_grad, input_dtype,
           activation_dtype, device, speed)  # fmt: skip
    plans = geometry.__dict__.setdefault("_budget_plans", {})
    if key not in plans:
        if len(plans) >= _MAX_PLANS_PER_TRUNK:
            plans.pop(next(iter(plans)))
        plan = plan_for_budget(
            module, geometry, input_shape, budget, grad=grad, input_grad=input_grad, input_dtype=input_dtype,
            activation_dtype=activation_dtype, device=device, tile_size=tiles, keep_graphs=keep_graphs,
            tile_batch=tile_batch, speed=speed,
        )  # fmt: skip
        log.info("memory_budget %s for input %s: %s", format_bytes(budget), tuple(input_shape), plan)
        plans[key] = plan
    return plans[key]
