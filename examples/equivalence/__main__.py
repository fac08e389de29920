"""Command line: ``python -m examples.equivalence [options]`` from the repository root."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path

from . import __doc__ as package_doc
from .experiment import Settings, compare
from .report import markdown, write_report
from .textures import load_textures

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; defaults are :class:`Settings`' (a minute or two on a CPU)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m examples.equivalence", description=package_doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=defaults.size, help="input side in pixels (paper: 320)")
    parser.add_argument(
        "--tile", type=int, default=None, help="tile side, halo included; unset: the smallest giving 2 x 2 tiles"
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (paper: 300)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (paper: 4)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (paper: 1e-3)")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=defaults.dtype, help="paper: float32")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights, data order and crops")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class, help="at most 12")
    parser.add_argument("--tune-per-class", type=int, default=defaults.tune_per_class, help="at most 4")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument(
        "--reference", action=argparse.BooleanOptionalAction, default=defaults.reference,
        help="with float32, also train conventionally in float64 to measure float32 rounding",
    )  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    parser.add_argument("--data", type=Path, default=REPO / ".data", help="cache folder for the texture images")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "equivalence", help="results folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the experiment, write the report, print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # one "GPU available" banner per run
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # a deprecation inside Lightning, not ours
    settings = Settings(
        size=args.size, tile=args.tile, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, dtype=args.dtype, seed=args.seed, train_per_class=args.train_per_class,
        tune_per_class=args.tune_per_class, threads=args.threads, reference=args.reference,
        progress=args.progress,
    )  # fmt: skip
    start = time.perf_counter()
    comparison = compare(settings, load_textures(args.data))
    command = "python -m examples.equivalence " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = write_report(comparison, args.out, command.strip())
    print(markdown(comparison, command.strip()))
    print(f"Wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
