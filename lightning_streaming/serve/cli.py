"""``lightning-streaming serve``: run the web service with waitress until interrupted."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["add_arguments", "run", "main"]

log = logging.getLogger("lightning_streaming.serve")

_THREADS = 8


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` options."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="the trained model's checkpoint (.ckpt)")
    parser.add_argument("--model", required=True, help="the model's class as module:Class (e.g. "
                        "examples.slide_demo:SlideClassifier)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 for every interface, best behind an HTTPS proxy)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--data-dir", type=Path, default=Path("serve-data"),
                        help="the one folder the service writes to: accounts, uploads, results (default ./serve-data)")
    parser.add_argument("--workers", type=int, default=1, help="prediction processes, each with its own copy of the "
                        "model (default 1)")  # fmt: skip
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                        help="memory the running predictions may use together (default: half of this machine's)")
    parser.add_argument("--max-upload", type=float, default=1024, metavar="MIB", help="largest upload (default 1024)")
    parser.add_argument("--trusted-proxy", default=None, metavar="ADDRESS",
                        help="a reverse proxy whose X-Forwarded-Proto/-For headers are believed (for HTTPS)")
    return parser


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 2 when the model cannot be loaded."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from waitress.server import create_server

        from .app import create_app
    except ModuleNotFoundError as error:
        log.error("the web service needs its extra (%s is not installed): pip install 'lightning_streaming[serve]'",
                  error.name)  # fmt: skip
        return 2
    from .settings import DataDir, ServeSettings

    if not args.checkpoint.is_file():
        log.error("no checkpoint at %s", args.checkpoint)
        return 2
    options = {}
    if args.memory_budget is not None:
        options["memory_budget"] = int(args.memory_budget * 2**30)
    settings = ServeSettings(
        checkpoint=str(args.checkpoint.resolve()), model=args.model, data_dir=args.data_dir, workers=args.workers,
        max_upload_bytes=int(args.max_upload * 2**20), trusted_proxy=args.trusted_proxy, **options,
    )  # fmt: skip
    data = DataDir(settings.data_dir)
    # Request bodies that waitress and Werkzeug spill to disk go to the data directory too.
    os.environ["TMPDIR"] = tempfile.tempdir = str(data.tmp)
    app = create_app(settings)
    pool = app.extensions["lightning_streaming"].pool
    log.info("loading the model from %s", settings.checkpoint)
    try:
        if not pool.wait_ready(timeout=600):
            log.error("%s", pool.state.error or "the model did not load within 600 s")
            return 2
        proxy = {}
        if args.trusted_proxy:
            proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_headers": {"x-forwarded-proto",
                     "x-forwarded-for"}, "clear_untrusted_proxy_headers": True}  # fmt: skip
        server = create_server(app, host=args.host, port=args.port, threads=_THREADS,
                               max_request_body_size=settings.max_upload_bytes + 2**20, **proxy)  # fmt: skip
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: leave the loop, then close
        log.info("model ready: %s", pool.state.model)
        log.info("Serving on http://%s:%s (data in %s)", server.effective_host, server.effective_port, data.root)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
    finally:
        pool.stop()
        log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_streaming.serve --checkpoint CKPT --model module:Class``."""
    parser = add_arguments(argparse.ArgumentParser(prog="lightning-streaming serve", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
