"""One streamed pass over a batch of images: the model's outputs, and the heatmaps asked for
(saliency, class activation maps, the head's location weights), pooled as they are made."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..core import RegionSource, stream_plan
from ..lightning.mixin import TrunkOverride, trunk_override
from ..lightning.settings import TileSize
from .cam import find_location_weights, grad_cam
from .geometry import Pooler
from .saliency import streamed_saliency

__all__ = ["HEATMAP_KINDS", "explain", "check_heatmap_kinds"]

#: ``"saliency"``: the input gradient of the predicted class's score, reduced per pixel;
#: ``"cam"``: Grad-CAM on the trunk's output; ``"attention"``: the head's ``location_weights``.
HEATMAP_KINDS = ("saliency", "cam", "attention")


def check_heatmap_kinds(kinds: Sequence[str], head: nn.Module | None = None) -> tuple[str, ...]:
    """``kinds`` checked: known names, and ``"attention"`` only for a head with ``location_weights``."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in HEATMAP_KINDS]
    if unknown:
        raise ValueError(f"unknown heatmap kind(s) {unknown}; choose from {list(HEATMAP_KINDS)}")
    if "attention" in kinds and head is not None and find_location_weights(head) is None:
        raise ValueError(
            f"heatmap 'attention' needs a head with a location_weights(features) method (the head, or the first "
            f"module of a sequential head); {type(head).__name__} has none. See ls.LocationWeights"
        )
    return tuple(dict.fromkeys(kinds))


class _ProgressSource(RegionSource):
    """A source that reports each region read (one per tile of the streamed forward)."""

    def __init__(self, image: Tensor | RegionSource, on_read: Callable[[], None]) -> None:
        self.image, self.on_read = image, on_read
        self.device = getattr(image, "device", torch.device("cpu"))
        self.requires_grad = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.image.dtype

    def read(self, region: tuple[slice, ...]) -> Tensor:
        if isinstance(self.image, Tensor):
            pixels = self.image[(slice(None), slice(None), *region)]
        else:
            pixels = self.image.read(region)
        self.on_read()
        return pixels


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _device_of(trunk: nn.Module) -> torch.device:
    for tensor in (*trunk.parameters(), *trunk.buffers()):
        return tensor.device
    return torch.device("cpu")


def explain(
    model: nn.Module,
    images: Tensor | RegionSource,
    poolers: Sequence[Mapping[str, Pooler]],
    *,
    task: str = "classification",
    tile_size: TileSize | None,
    saliency_tile_size: TileSize,
    memory_budget: int | None = None,
    reduction: str = "max_abs",
    targets: Sequence[int] | None = None,
    progress: Callable[[float], None] | None = None,
) -> Tensor:
    """Run ``model`` (a :class:`~lightning_streaming.StreamingMixin`) on ``images`` in eval
    mode, streaming its trunk without a graph, and fill each image's poolers.

    For heatmaps, the score is the output of ``targets`` (class or regression-target
    index per image; default: the predicted class, or the first target), and its gradient
    with respect to the trunk's output comes from the head (the trunk output is held, so
    this costs one small backward). ``"cam"`` and ``"attention"`` are computed from the
    trunk's output; ``"saliency"`` streams the gradient back through the trunk tile by
    tile (:func:`streamed_saliency`).

    Args:
        model: the model; its ``forward`` must run the trunk once through ``forward_trunk``.
        images: ``(N, C, H, W)``, a tensor or a lazy source (uint8 with the model's ``tile_transform``).
        poolers: per image, the heatmap kinds wanted and the :class:`Pooler` each goes to.
        task: ``"classification"``, ``"multilabel"`` or ``"regression"``.
        tile_size: tile size of the forward pass (no graph is kept: it may be large); None:
            the core's planner chooses the forward's tiles within ``memory_budget`` bytes
            (it may stream only a Sequential trunk's first children and run the rest whole).
        saliency_tile_size: tile size of the saliency backward (one tile's graph at a time).
        reduction: how saliency reduces a pixel's channels (``"max_abs"`` or ``"l2"``).
        targets: the output index whose score the heatmaps explain, per image.
        progress: called with the fraction done (0..1) as tiles finish.

    Returns:
        The model's outputs ``(N, ...)``, detached.
    """
    trunk, head = model.streaming_split()  # type: ignore[operator]
    kinds = set().union(*(set(p) for p in poolers)) if poolers else set()
    needs_grad = bool(kinds & {"saliency", "cam"})
    captured: list[Any] = []

    def capture(features: Any) -> Any:
        leaves = pytree.tree_map(lambda t: t.detach().requires_grad_(needs_grad), features)
        captured.append(leaves)
        return leaves

    device = _device_of(trunk)
    forward_share = 1 / 3 if "saliency" in kinds else 1.0
    source: Tensor | RegionSource = images
    budget = memory_budget if tile_size is None else None  # an explicit tile is followed as given
    if progress is not None:
        plan = stream_plan(trunk, tuple(images.shape), tile_size if tile_size is not None else "auto",
                           memory_budget=budget, grad=False, input_dtype=images.dtype, device=device)  # fmt: skip
        tiles = len(plan.tiles)
        reads = iter(range(1, tiles + 1))
        source = _ProgressSource(images, lambda: progress(forward_share * min(next(reads, tiles), tiles) / tiles))
    override = TrunkOverride(tile_size=tile_size, memory_budget=budget, tile_device=device, capture=capture)
    with _eval_mode(model), trunk_override(model, override), torch.set_grad_enabled(needs_grad):
        outputs = model(source)
        if len(captured) != 1:
            raise TypeError(
                f"{type(model).__name__}.forward ran the trunk {len(captured)} times; heatmaps and whole-slide "
                "prediction need a forward that calls self.forward_trunk(x) once (the default forward does)"
            )
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"{type(model).__name__}.forward returned a {type(outputs).__name__}; prediction needs one tensor of "
                "logits (N, classes) or values (N, targets)"
            )
        if needs_grad:
            _heatmaps(model, trunk, head, images, captured[0], outputs, poolers, kinds, task, saliency_tile_size,
                      reduction, targets, device, progress, forward_share)  # fmt: skip
        elif "attention" in kinds:
            _attention(head, captured[0], poolers)
    if progress is not None:
        progress(1.0)
    return outputs.detach()


def _attention(head: nn.Module, features: Any, poolers: Sequence[Mapping[str, Pooler]]) -> None:
    weights = find_location_weights(head)
    if weights is None:
        raise ValueError(f"heatmap 'attention' needs a head with location_weights; {type(head).__name__} has none")
    with torch.no_grad():
        values = weights.location_weights(_single(features, "attention"))
    values = values.reshape(len(poolers), *values.shape[-2:]).to("cpu", torch.float64).numpy()
    for n, wanted in enumerate(poolers):
        if "attention" in wanted:
            wanted["attention"].add_grid(values[n])


def _single(features: Any, kind: str) -> Tensor:
    leaves = pytree.tree_leaves(features)
    if len(leaves) != 1 or leaves[0].dim() != 4:
        raise ValueError(f"heatmap {kind!r} needs a trunk that returns one feature map (N, C, h, w)")
    return leaves[0]


def _heatmaps(
    model: nn.Module,
    trunk: nn.Module,
    head: nn.Module,
    images: Tensor | RegionSource,
    features: Any,
    outputs: Tensor,
    poolers: Sequence[Mapping[str, Pooler]],
    kinds: set[str],
    task: str,
    saliency_tile_size: TileSize,
    reduction: str,
    targets: Sequence[int] | None,
    device: torch.device,
    progress: Callable[[float], None] | None,
    forward_share: float,
) -> None:
    flat = outputs.reshape(len(outputs), -1)
    if targets is None:
        targets = [0] * len(flat) if task == "regression" else flat.argmax(dim=1).tolist()
    score = flat[torch.arange(len(flat)), torch.as_tensor(list(targets), device=flat.device)].sum()
    leaves, spec = pytree.tree_flatten(features)
    grads = torch.autograd.grad(score, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    if "cam" in kinds:
        cam = grad_cam(_single(features, "cam").detach(), grads[0]).to("cpu", torch.float64).numpy()
        for n, wanted in enumerate(poolers):
            if "cam" in wanted:
                wanted["cam"].add_grid(cam[n])
    if "attention" in kinds:
        _attention(head, features, poolers)
    if "saliency" not in kinds:
        return

    def sink(row: int, col: int, values: Any) -> None:
        for n, wanted in enumerate(poolers):
            if "saliency" in wanted:
                wanted["saliency"].add(row, col, values[n])

    on_tile = None
    if progress is not None:
        on_tile = lambda done, total: progress(forward_share + (1 - forward_share) * done / total)  # noqa: E731
    tile_device = None if isinstance(images, Tensor) and images.device == device else device
    with torch.no_grad():
        streamed_saliency(
            trunk, images, saliency_tile_size, pytree.tree_unflatten(grads, spec), sink, reduction=reduction,
            transform=model.streaming_transform(), tile_device=tile_device, on_tile=on_tile,  # type: ignore[operator]
        )  # fmt: skip
