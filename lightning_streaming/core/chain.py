"""Streaming only the first children of a ``Sequential`` trunk and running the rest whole.

A CNN's memory is in its first, high-resolution layers; its late layers hold little at
their low resolution, but their receptive fields are wide, and a tile's halo grows with
the receptive field of everything the tile runs (a ResNet body's last stage sees 435
pixels around a pixel, its second stage 99). So within a memory budget, streaming the
first children of a ``Sequential`` trunk with small halos and running the rest
conventionally on their (small) output can be much faster than streaming the whole trunk,
and it is exact just the same. The budget planner (:mod:`.budget`) weighs it like any
other plan.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .graph import TrunkGeometry


def chain_of(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named children of ``module`` when it is a plain ``nn.Sequential`` (its own
    ``forward``, no hooks of its own) of two or more children, which runs them one after
    another; else an empty list (the trunk is never split)."""
    if type(module) is not nn.Sequential or len(module) < 2:
        return []
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    if any(getattr(module, name, None) for name in hooks):
        return []
    return list(module.named_children())


def split_modules(module: nn.Module, streamed: int) -> tuple[nn.Sequential, nn.Sequential]:
    """``(prefix, suffix)``: the first ``streamed`` children of ``module`` and the rest, as
    ``Sequential`` modules under their own names, sharing the children's parameters."""
    children = list(module.named_children())
    return nn.Sequential(OrderedDict(children[:streamed])), nn.Sequential(OrderedDict(children[streamed:]))


def prefix_geometry(geometry: TrunkGeometry, name: str) -> TrunkGeometry | None:
    """The geometry of the trunk up to its child ``name`` (cached with ``geometry``), or
    None if the analysis did not see that child make exactly one feature map."""
    nodes = geometry.module_nodes.get(name)
    if not nodes or len(set(nodes)) != 1:
        return None
    cache = geometry.__dict__.setdefault("_prefixes", {})
    if name not in cache:
        cache[name] = geometry.truncated(nodes[-1])
    return cache[name]
