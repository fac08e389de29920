"""How fast a device runs operators: a roofline with a cache and an allocator, measured
once per device.

The budget planner (:mod:`.budget`) predicts a tile's time from the FLOPs and bytes of
each operator the trunk calls (:mod:`.memory`). An operator takes the longer of its
arithmetic (FLOPs at the device's matrix-product rate) and its memory traffic (bytes at
the bandwidth of the level its operands fit in: the last-level cache or main memory),
plus a fixed cost per call (dispatch, autograd, kernel launch), plus, on a CPU, the cost
of touching fresh memory for every output too large for the allocator to reuse (glibc
hands blocks above its mmap threshold, at most 32 MiB, back to the kernel on free, so each
new one is page-faulted in again). The last two terms are why a small tile runs faster
per pixel than a whole image on a CPU.

The rates are nominal by default (:func:`nominal_speed`: per CPU thread, or a current
data-centre GPU), so plans are deterministic: the same on every run and every process of
a job. :func:`measure_speed` measures them with micro-benchmarks (well under a second;
meaningful on an otherwise idle machine) and :func:`set_device_speed` makes the planner
use a measured or hand-made :class:`DeviceSpeed`.
"""

from __future__ import annotations

import functools
import glob
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

_CACHE: dict[tuple, "DeviceSpeed"] = {}
_LOCK = threading.Lock()
_DEFAULT_CACHE_BYTES = 8 * 2**20
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


@dataclass(frozen=True)
class DeviceSpeed:
    """Operator throughput of one device (see the module docstring for the model).

    Args:
        flops_per_second: arithmetic rate (a matrix product).
        bytes_per_second: memory traffic of operands larger than the cache.
        cache_bytes_per_second: memory traffic of operands that fit in the cache.
        cache_bytes: size of the last-level cache (0: no cache term).
        fresh_bytes_per_second: rate of touching newly allocated memory (page faults);
            0 where the allocator reuses memory (CUDA's caching allocator).
        reuse_bytes: largest allocation the allocator reuses without fresh pages.
        seconds_per_op: fixed cost of one operator call.
    """

    flops_per_second: float
    bytes_per_second: float
    cache_bytes_per_second: float
    cache_bytes: int
    fresh_bytes_per_second: float
    reuse_bytes: int
    seconds_per_op: float

    def op_seconds(self, flops: float, nbytes: float, allocated: float = 0.0) -> float:
        """Predicted time of one operator with ``flops``, ``nbytes`` of traffic and outputs
        of ``allocated`` bytes (above the allocator's reuse size, they cost fresh pages)."""
        bandwidth = self.cache_bytes_per_second if nbytes <= self.cache_bytes else self.bytes_per_second
        seconds = max(flops / self.flops_per_second, nbytes / bandwidth) + self.seconds_per_op
        if self.fresh_bytes_per_second and allocated > self.reuse_bytes:
            seconds += allocated / self.fresh_bytes_per_second
        return seconds


def device_speed(device: torch.device | str, dtype: torch.dtype = torch.float32) -> DeviceSpeed:
    """The :class:`DeviceSpeed` the planner uses for ``device`` and ``dtype`` activations:
    one given to :func:`set_device_speed`, else :func:`nominal_speed`."""
    key = _key(torch.device(device), dtype)
    with _LOCK:
        chosen = _CACHE.get(key) or _CACHE.get(key[:-2] + (None, key[-1]))
    return chosen if chosen is not None else nominal_speed(device, dtype)


def set_device_speed(device: torch.device | str, speed: DeviceSpeed | None, dtype: torch.dtype | None = None) -> None:
    """Make the planner use ``speed`` for ``device`` (for ``dtype`` activations, or every
    dtype); None goes back to :func:`nominal_speed`. Plans already made are kept: set it
    before the first streamed step. Example: ``set_device_speed("cuda", measure_speed("cuda"))``."""
    key = _key(torch.device(device), dtype)
    with _LOCK:
        if speed is None:
            _CACHE.pop(key, None)
        else:
            _CACHE[key] = speed


def _key(device: torch.device, dtype: torch.dtype | None) -> tuple:
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return (device.type, index, dtype, threads)


def nominal_speed(device: torch.device | str, dtype: torch.dtype = torch.float32) -> DeviceSpeed:
    """Round rates of the kind of device: a CPU thread does 20 GFLOP/s in convolutions
    (about a fifth of an AVX2 core's peak, what thin and wide convolutions average), moves
    50 GB/s within the last-level cache (its size read from Linux, else 8 MiB) and shares 10
    GB/s of memory bandwidth, page-faults fresh memory at 1 GB/s, and calls an operator in
    20 microseconds with one thread, 1 ms with several (forking and joining the thread
    pool: about 10 microseconds measured on an idle 2-core machine, but 8 to 30 ms when
    other processes share the cores and a descheduled thread holds up every operator; 1 ms
    keeps tiles small enough to stay in the caches, which made the 2048² training steps of
    benchmarks/budget_speed.py 5-10% faster than 5 ms did on the idle machine, while still
    preferring fewer, larger tiles where the gain is small); a GPU does 50 TFLOP/s in float32 (TF32 convolutions) and 200 in 16-bit
    types, moves 2 TB/s (5 within its L2), reuses memory (caching allocator) and calls an
    operator in 20 microseconds (eager dispatch and launch)."""
    device = torch.device(device)
    if device.type == "cuda":
        flops = 200e12 if dtype in (torch.float16, torch.bfloat16) else 50e12
        return DeviceSpeed(flops, 2e12, 5e12, _cache_bytes(device), 0.0, 2**62, 20e-6)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    fresh = 1e9 * threads if device.type == "cpu" else 0.0
    per_op = 1e-3 if threads > 1 else 20e-6
    return DeviceSpeed(20e9 * threads, 10e9, 50e9 * threads, _cache_bytes(device), fresh, _reuse_bytes(), per_op)


def measure_speed(device: torch.device | str, dtype: torch.dtype = torch.float32) -> DeviceSpeed:
    """Measure a :class:`DeviceSpeed`: a matrix product for the arithmetic rate, additions
    of operands within and beyond the cache for the two bandwidths, filling fresh blocks
    above the allocator's reuse size for the page-fault rate (CPU), and a loop of tiny
    module calls with autograd for the cost per call. Each is the fastest of a few
    repeats, so a busy machine disturbs it less."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = torch.empty((), dtype=dtype).element_size()
    with torch.no_grad():
        side = 4096 if cuda else 512
        a = torch.ones(side, side, device=device, dtype=dtype)
        flops = 2 * side**3 / _fastest(lambda: torch.mm(a, a), device, 5)
        cache = _cache_bytes(device)
        # Operands that together exceed the cache, small enough for the allocator to reuse.
        big = torch.ones(2, max(cache // 2, 4 * 2**20) // size, device=device, dtype=dtype)
        bandwidth = 3 * big[0].nbytes / _fastest(lambda: torch.add(big[0], big[1]), device, 3)
        small = torch.ones(2, max(1, cache // 16 // size), device=device, dtype=dtype)
        seconds = _fastest(lambda: torch.add(small[0], small[1]), device, 10)
        cache_bandwidth = max(bandwidth, 3 * small[0].nbytes / seconds)
        fresh, reuse = 0.0, 2**62
        if device.type == "cpu":
            reuse = _reuse_bytes()
            numel = 2 * reuse // size
            fresh = numel * size / _fastest(lambda: torch.empty(numel, dtype=dtype).fill_(1), device, 3)
        tiny = torch.nn.Conv2d(1, 1, 1).to(device)
        one = torch.ones(1, 1, 1, 1, device=device)
    with torch.enable_grad():  # a trunk's operator: a module call, recorded by autograd
        per_op = _fastest(lambda: [tiny(one) for _ in range(50)], device, 3) / 50
    return DeviceSpeed(flops, bandwidth, cache_bandwidth, cache, fresh, reuse, per_op)


def _fastest(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    work()  # warm-up: kernels, thread pools, allocator
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _reuse_bytes() -> int:
    """glibc's mmap threshold: a fixed one when set, else its dynamic one's ceiling."""
    fixed = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return int(fixed) if fixed and fixed.isdigit() else _GLIBC_MMAP_THRESHOLD_MAX


@functools.lru_cache(maxsize=None)
def _cache_bytes(device: torch.device) -> int:
    """The last-level cache: the GPU's L2, or the largest CPU cache Linux reports (8 MiB
    where it reports none)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    if device.type != "cpu":
        return 0
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as file:
                text = file.read().strip().upper()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=_DEFAULT_CACHE_BYTES)
