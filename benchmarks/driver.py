"""The command-line skeleton the benchmark drivers share: a measurement in a child
process, or a run saved as JSON with its arguments, or tables and plots redone from it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence


def run_driver(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    name: str,
    child: Callable[[str], int],
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    write: Callable[[dict[str, Any], argparse.Namespace], None],
) -> int:
    """``child(spec_json)`` with ``--child``; else ``measure(args)``, saved with the
    arguments to ``<out-dir>/<name>.json``, then ``write(saved, args)``; with ``--replot``
    only ``write``, from the saved JSON and the arguments that measured it."""
    args = parse_args(argv)
    if args.child is not None:
        return child(args.child)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    raw = args.out_dir / f"{name}.json"
    if args.replot:
        saved = json.loads(raw.read_text())
        args = parse_args([*saved["args"], "--out-dir", str(args.out_dir)])
        write(saved, args)
        return 0
    saved = measure(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"args": args.argv, **saved}, indent=1))
    write(saved, args)
    return 0
