"""The streamed computation: tiled forward under no_grad, tiled recompute-and-backward."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .graph import TrunkGeometry, geometry_of
from .plan import Segment, TilePlan, normalise_tile_size, plan_tiles
from .source import RegionSource, is_region_source
from .tracing import TraceInputError, expected_spatial_dims

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


class _TileRunner:
    """Runs the trunk on the tiles of one plan; shared by the forward and the backward."""

    def __init__(
        self,
        module: nn.Module,
        plan: TilePlan,
        params: list[Tensor],
        device: torch.device,
        transform: Callable[[Tensor], Tensor] | None,
    ):
        self.module, self.plan, self.params = module, plan, params
        self.param_names = _parameter_names(module, params)
        self.device, self.transform = device, transform
        self.tiles = list(plan)
        self.outputs = len(plan.output_shapes)
        self.autocast = (
            device.type,
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )

    def run(self, region: Tensor, tile: Tile, aliases: dict[str, Tensor] | None = None) -> list[Tensor]:
        """The trunk's exact outputs on ``tile``'s output boxes; with ``aliases``, computed
        with those stand-ins for the parameters."""
        inputs = region if self.transform is None else self.transform(region)
        if aliases is None:
            out = self.module(inputs)
        else:
            out = torch.func.functional_call(self.module, aliases, (inputs,))
        leaves = pytree.tree_leaves(out)
        crops = []
        for k, leaf in enumerate(leaves):
            crop = leaf[_crop_index(tile, k)]
            expected = tuple(s.outputs[k][1] - s.outputs[k][0] for s in tile)
            if tuple(crop.shape[2:]) != expected:
                raise RuntimeError(
                    f"internal error: a tile's output {k} has shape {tuple(leaf.shape)}, which does not cover the "
                    f"planned box {expected}; please report this with the trunk's definition"
                )
            crops.append(crop)
        if len(crops) != self.outputs:
            raise RuntimeError(f"the trunk returned {len(crops)} feature maps on a tile, {self.outputs} when analysed")
        return crops

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

    def forward(self, x: Tensor | RegionSource, keep_graphs: int = 0, requires_input_grad: bool = False):
        """Tiled forward. The graphs of the last ``keep_graphs`` tiles are kept (the backward
        visits them first), the rest run under no_grad."""
        outputs: list[Tensor] | None = None
        kept: dict[int, tuple[dict[str, Tensor], Tensor, list[Tensor]]] = {}
        first_kept = len(self.tiles) - keep_graphs
        for index, tile in enumerate(self.tiles):
            region = self.read(x, tile)
            if index >= first_kept:
                with torch.enable_grad():
                    aliases = self.aliases()
                    region = region.detach().requires_grad_(requires_input_grad)
                    crops = self.run(region, tile, aliases)
                kept[index] = (aliases, region, crops)
            else:
                with torch.no_grad():
                    crops = self.run(region, tile)
            if outputs is None:
                outputs = [
                    torch.empty(tuple(c.shape[:2]) + shape, dtype=c.dtype, device=c.device)
                    for c, shape in zip(crops, self.plan.output_shapes)
                ]
            for k, crop in enumerate(crops):
                outputs[k][_output_index(tile, k)] = crop.detach()
        assert outputs is not None
        return outputs, kept

    def backward(
        self,
        x: Tensor | RegionSource,
        grad_outputs: Sequence[Tensor | None],
        kept: dict[int, tuple[dict[str, Tensor], Tensor, list[Tensor]]],
        needs_param_grad: Sequence[bool],
        needs_input_grad: bool,
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """Recompute each tile with grad and backpropagate its slices of ``grad_outputs``;
        sum the parameter gradients locally so each parameter gets one gradient."""
        wanted = [name for name, need in zip(self.param_names, needs_param_grad) if need]
        sums: list[Tensor | None] = [None] * len(wanted)
        grad_input = torch.zeros_like(x) if needs_input_grad else None
        device_type, enabled, dtype = self.autocast
        for index in reversed(range(len(self.tiles))):
            tile = self.tiles[index]
            if index in kept:
                aliases, region, crops = kept.pop(index)
            else:
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    aliases = self.aliases()
                    region = self.read(x, tile).detach().requires_grad_(needs_input_grad)
                    crops = self.run(region, tile, aliases)
            pairs = [
                (crop, grad[_output_index(tile, k)])
                for k, (crop, grad) in enumerate(zip(crops, grad_outputs))
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
                grad_input[_region_index(tile)] += grads[-1].to(grad_input.device)
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
    def forward(ctx, runner: _TileRunner, keep_graphs: int, x: Tensor, *params: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        outputs, kept = runner.forward(x, keep_graphs, requires_input_grad=ctx.needs_input_grad[2])
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
    tile_size: int | Sequence[int],
    *,
    keep_graphs: int = 1,
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

    Args:
        module: the trunk, a module of local operations mapping (N, C, *spatial) to
            (N, C', *spatial') (or a structure of such maps), with 1, 2 or 3 spatial
            dimensions.
        input: the image batch, (N, C, *spatial), of any spatial size: a tensor, or a
            :class:`RegionSource` that reads each tile's region on demand, so the image
            is never held whole (no input gradient then).
        tile_size: largest input region per tile in pixels, halo included: an int for
            every dimension or one per spatial dimension.
        keep_graphs: number of tiles whose graphs the forward keeps for the backward
            (default 1; 0 for the smallest memory while the head runs).
        tile_device: device to run tiles on when the input lives elsewhere (e.g. a
            host-resident image streamed to the GPU); defaults to the trunk's device.
        transform: per-pixel function applied to each tile before the trunk (e.g.
            normalising a uint8 image), so the full float image never exists. It must be
            pixel-wise: it is not analysed.

    Returns:
        ``module(input)``, computed tile by tile.
    """
    if not isinstance(keep_graphs, int) or isinstance(keep_graphs, bool) or keep_graphs < 0:
        raise ValueError(
            f"keep_graphs must be a non-negative int (the number of tiles whose graphs the forward keeps), "
            f"got {keep_graphs!r}"
        )
    if tile_device is not None:
        device = torch.device(tile_device)
    else:
        device = _trunk_device(module, input.device if isinstance(input, Tensor) else torch.device("cpu"))
    _check_input(module, input, device, tile_device is not None, transform)
    geometry = _geometry_for(module, input.shape)
    spatial = tuple(int(s) for s in input.shape[2:])
    plan = _cached_plan(geometry, spatial, normalise_tile_size(tile_size, len(spatial)))
    params = [p for p in module.parameters() if p.requires_grad]
    runner = _TileRunner(module, plan, params, device, transform)
    if not torch.is_grad_enabled() or not (getattr(input, "requires_grad", False) or params):
        with torch.no_grad():
            outputs = runner.forward(input)[0]
    else:
        outputs = list(_StreamFunction.apply(runner, min(keep_graphs, len(plan)), input, *params))
    return pytree.tree_unflatten(outputs, geometry.output_spec)
