"""One streamed training step on a slide larger than this machine could hold as a float tensor.

Builds (once, cached) a generic pyramidal TIFF of SIZE x SIZE pixels at 0.5 um/px: glass
with blocks of the real H&E slide CMU-1-Small-Region laid out like tissue sections
(level 0 tiles are zlib-compressed once per distinct content, so writing takes seconds;
the file is mostly tissue-free glass and about 1 GB for the default size). Then trains one
step through SlideDataModule(lazy=True) and StreamingStrategy: the slide's level 0 is a
lazy region source read tile by tile, uint8 on the host, normalised per tile; it is never
materialised, not even as uint8. Prints the image size, its float32 size against the
machine's memory, tiles, time and the process's peak resident memory.

    python scripts/large_slide_step.py                 # 51200 x 51200 (float32: 29.3 GiB)
    python scripts/large_slide_step.py --size 20480 --memory-limit 4   # a 4 GiB process, 4.7 GiB float input
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_streaming as ls

REPO = Path(__file__).resolve().parent.parent
TILE = 512
BLOCK = (2560, 2048)  # one tissue block: 5 x 4 TIFF tiles of the real slide at 0.5 um/px


def tissue_blocks(rows: int, cols: int) -> np.ndarray:
    """Which blocks hold tissue: two elliptical 'sections' with gaps, about a fifth of the area."""
    i, j = np.mgrid[0:rows, 0:cols]
    left = ((i - rows * 0.35) / (rows * 0.3)) ** 2 + ((j - cols * 0.3) / (cols * 0.2)) ** 2 < 1
    right = ((i - rows * 0.6) / (rows * 0.3)) ** 2 + ((j - cols * 0.72) / (cols * 0.16)) ** 2 < 1
    return (left | right) & ((i * 7 + j * 3) % 5 != 0)


def build_slide(path: Path, size: int, cmu: Path) -> Path:
    import tifffile

    if path.is_file():
        return path
    rows, cols = size // BLOCK[0], size // BLOCK[1]
    height, width = rows * BLOCK[0], cols * BLOCK[1]
    pattern = tissue_blocks(rows, cols)
    slide = ls.Slide(cmu)
    block = slide.read_array(0.5)[: BLOCK[0], : BLOCK[1]]
    white = np.full((TILE, TILE, 3), 255, np.uint8)
    encoded: dict[tuple[int, int] | None, bytes] = {None: zlib.compress(white.tobytes(), 6)}
    for r in range(BLOCK[0] // TILE):
        for c in range(BLOCK[1] // TILE):
            tile = np.ascontiguousarray(block[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE])
            encoded[(r, c)] = zlib.compress(tile.tobytes(), 6)

    def level0():
        per_block = (BLOCK[0] // TILE, BLOCK[1] // TILE)
        for tr in range(height // TILE):
            for tc in range(width // TILE):
                tissue = pattern[tr // per_block[0], tc // per_block[1]]
                yield encoded[(tr % per_block[0], tc % per_block[1])] if tissue else encoded[None]

    small = slide.read_array(8.0)  # level 1: downsample 16, 8 um/px
    sb = (BLOCK[0] // 16, BLOCK[1] // 16)
    level1 = np.full((height // 16, width // 16, 3), 255, np.uint8)
    for i, j in zip(*np.nonzero(pattern)):
        level1[i * sb[0] : (i + 1) * sb[0], j * sb[1] : (j + 1) * sb[1]] = small[: sb[0], : sb[1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        for level, (data, spacing) in enumerate([(level0(), 0.5), (level1, 8.0)]):
            per_cm = 1e4 / spacing
            options = dict(shape=(height, width, 3), dtype=np.uint8) if level == 0 else {}
            tif.write(data, tile=(TILE, TILE), photometric="rgb", compression="zlib", subfiletype=1 if level else 0,
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **options)  # fmt: skip
    os.replace(partial, path)
    return path


class Classifier(ls.StreamingMixin, pl.LightningModule):
    def __init__(self, mean, std):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 8, stride=8), nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        self.tile_transform = ls.Uint8Normalize(mean, std)
        self.record: dict = {}

    def training_step(self, batch, batch_idx):
        images, labels = batch
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(self(images), labels)
        self.record.update(shape=tuple(images.shape), kind=type(images).__name__, forward_s=time.perf_counter() - start)
        self.record["loss"] = float(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.record["step_s"] = time.perf_counter()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=51200, help="slide side in pixels at 0.5 um/px")
    parser.add_argument("--tile", type=int, default=4096, help="streaming tile size")
    parser.add_argument("--data", type=Path, default=REPO / ".data")
    parser.add_argument(
        "--memory-limit", type=float, default=None, metavar="GIB",
        help="cap this process's address space (RLIMIT_AS) at GIB, to play a smaller machine",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    slides = ls.example_slides(args.data)
    start = time.perf_counter()
    path = build_slide(args.data / "large" / f"mosaic-{args.size}.tiff", args.size, slides.cmu_small_region)
    print(f"slide: {path} ({path.stat().st_size / 1e9:.2f} GB on disk, ready in {time.perf_counter() - start:.0f} s)")

    manifest = args.data / "large" / f"mosaic-{args.size}.csv"
    manifest.write_text(f"slide,label\n{path},1\n")
    # Flips and rotations (lazy views); no colour jitter, which costs a float pass per pixel.
    augmentation = ls.Augmentation(brightness=0, contrast=0, saturation=0, hue=0)
    data = ls.SlideDataModule(train=manifest, spacing=0.5, lazy=True, tissue=None, augmentation=augmentation)
    model = Classifier([0.80, 0.70, 0.80], [0.15, 0.20, 0.15])
    shape = (1, 3, *ls.Slide(path).size(0.5))
    float_bytes = 4 * int(np.prod(shape))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if args.memory_limit is not None:
        limit = int(args.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        ram = min(ram, limit)
        print(f"address space capped at {args.memory_limit:g} GiB (RLIMIT_AS), imports included")
    print(f"input: {shape}, uint8 {float_bytes / 4 / 2**30:.1f} GiB, as float32 {float_bytes / 2**30:.1f} GiB; "
          f"memory available to this process: {ram / 2**30:.1f} GiB")  # fmt: skip
    try:
        whole = torch.empty(shape, dtype=torch.float32)
        print("  (allocating the float32 tensor succeeded only virtually: it was never touched)")
        del whole
    except RuntimeError as error:
        print(f"  allocating it as float32 fails here: {str(error).splitlines()[0][:100]}")
    plan = ls.tile_plan(model.trunk, shape, args.tile)
    out_bytes = 4 * 8 * int(np.prod(plan.output_shape))
    print(f"tiles: {len(plan)} ({' x '.join(map(str, plan.grid))}, largest input region {plan.largest_region}); "
          f"trunk output {plan.output_shape}: {out_bytes / 2**20:.0f} MiB, and as much for its gradient")  # fmt: skip

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    trainer = pl.Trainer(
        strategy=ls.StreamingStrategy(tile_size=args.tile, input_on_host=True), max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    r = model.record
    print(f"step: a {r['kind']} of shape {r['shape']} streamed; loss {r['loss']:.4f}; forward {r['forward_s']:.0f} s, "
          f"whole step {elapsed:.0f} s")  # fmt: skip
    print(f"peak resident memory of the process: {peak:.2f} GiB (before the step: {before:.2f} GiB); "
          f"the input as float32 would be {float_bytes / 2**30:.1f} GiB")  # fmt: skip
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(f"peak virtual memory: {status.get('VmPeak', '?').strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
