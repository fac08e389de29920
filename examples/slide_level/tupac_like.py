"""Slide-level regression in the shape of the streaming paper's TUPAC16 experiment
(section VI): the Table III network with BatchNorm in its last two blocks (the un-streamed
head) and dropout 0.5 before the fully connected layer, He initialisation, Huber loss
with delta 1 (smooth L1), Adam 1e-4 with the learning rate times 0.99 per epoch;
validation Spearman correlation (the checkpoint's criterion).

Run from the repository root:

    python examples/slide_level/tupac_like.py                        # smoke mode, about a minute on 2 CPU cores
    python examples/slide_level/tupac_like.py --train train.csv --val val.csv --accelerator gpu
    python examples/slide_level/tupac_like.py --train train.csv --val val.csv --input-size 8192 \\
        --spacing 2 --extra-blocks auto --tile 2048               # the paper's 28-layer network
    python examples/slide_level/tupac_like.py --train train.csv --val val.csv --freeze-bn \\
        --init-weights results/tupac_like/checkpoints/best-epoch12.ckpt   # fine-tune, BatchNorm frozen

Manifests are SlideDataModule's CSVs: ``slide,<target>`` (one or more numeric columns;
optional ``base_spacing`` and ``tissue_mask`` columns). Without ``--train`` it runs in
smoke mode on a made-up target: the real H&E slide CMU-1-Small-Region is listed several
times, each row declaring a different level-0 spacing (0.40 to 0.60 um/px) in its
``base_spacing`` column, and that declared spacing is the row's target. At a fixed
training spacing it changes how large the cells look, so the image does carry the
target, but it is not a biological quantity: smoke mode proves that the pipeline runs end
to end on a real slide, its numbers say nothing about accuracy.

Writes ``results/tupac_like/tupac_like.md`` (settings and per-epoch table) and
``tupac_like.png`` (losses and validation Spearman per epoch), CSV logs under ``logs/``
and the best checkpoint under ``checkpoints/``. ``--help`` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared modules beside this file

import pytorch_lightning as pl  # noqa: E402

import lightning_streaming as ls  # noqa: E402
from slide_training import RunResult, TaskDefaults, main_for, setup_logging  # noqa: E402


def smoke_manifests(folder: Path, slides: ls.ExampleSlides) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``val.csv``: the real slide at several declared spacings,
    the declared spacing as the (made-up) target."""
    folder.mkdir(parents=True, exist_ok=True)
    slide = slides.cmu_small_region
    paths = []
    for name, spacings in (("train.csv", (0.40, 0.44, 0.48, 0.52, 0.56, 0.60)), ("val.csv", (0.42, 0.50, 0.58))):
        path = folder / name
        path.write_text("slide,target,base_spacing\n" + "".join(f"{slide},{s},{s}\n" for s in spacings))
        paths.append(path)
    return paths[0], paths[1]


DEFAULTS = TaskDefaults(
    name="tupac_like", task="regression", dropout=0.5, batch_norm=True, weight_decay=0.0, lsuv=False,
    smoke_manifests=smoke_manifests,
    smoke_note=(
        "Smoke mode: a made-up target on one real slide. Every row is CMU-1-Small-Region declared at another scan "
        "spacing (0.40-0.60 um/px), and that spacing is the target; 6 training rows, 3 validation rows, 3 epochs of "
        "a network that has barely started training. With 3 validation rows Spearman can only be -1, -0.5, 0.5 or 1, "
        "and the losses of an untrained network may rise or fall: this run shows the pipeline works end to end, not "
        "that the model learns."
    ),
)  # fmt: skip


def main(argv: list[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """Parse ``argv`` (default: the command line), train with ``callbacks`` added to the
    Trainer's, and write the results."""
    return main_for(DEFAULTS, __doc__.splitlines()[0] if __doc__ else "", argv, callbacks)


if __name__ == "__main__":
    setup_logging()
    main()
