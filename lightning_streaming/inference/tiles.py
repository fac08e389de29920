"""The default memory budget of inference: the core's planner (:func:`~lightning_streaming.stream_plan`)
chooses the forward's tiles within it; without a graph they can be far larger than a
training step's."""

from __future__ import annotations

import os

import torch

__all__ = ["default_memory_budget"]

_GiB = 2**30


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """A quarter of the memory available on ``device`` now (CUDA: free device memory; CPU:
    the kernel's MemAvailable), between 256 MiB and 8 GiB."""
    device = torch.device(device or "cpu")
    available = None
    if device.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
        except OSError:
            available = None
        if available is None and hasattr(os, "sysconf"):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if not available:
        return 2 * _GiB
    return int(min(8 * _GiB, max(256 * 2**20, available // 4)))
