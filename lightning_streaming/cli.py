"""The ``lightning-streaming`` command (also ``python -m lightning_streaming``).

Each subcommand is one line of :data:`COMMANDS`: its name, the module that implements it
and a one-line description. The module has ``add_arguments(parser)`` and ``run(args) ->
int``; it is imported only when its subcommand runs (or its help is asked for), so the
command starts quickly and optional parts (the web service) need their extras only when
used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main"]

#: name -> (module, description)
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": (
        "lightning_streaming.inference.command",
        "predict slides with a trained model; write predictions, heatmaps and overlays",
    ),
    "serve": (
        "lightning_streaming.serve.cli",
        "a web page and JSON API: users upload images and see predictions and heatmaps",
    ),
}  # fmt: skip


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {description}" for name, (_, description) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="lightning-streaming",
        description="Streaming CNNs on gigapixel images: commands for trained models.",
        epilog=f"commands:\n{lines}\n\nRun 'lightning-streaming COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; returns its exit status."""
    args = _top_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    module_name, description = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lightning-streaming {args.command}", description=description)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.arguments)) or 0)


if __name__ == "__main__":
    sys.exit(main())
