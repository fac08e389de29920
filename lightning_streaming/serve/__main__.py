"""``python -m lightning_streaming.serve``: the same as ``lightning-streaming serve``."""

import sys

from .cli import main

sys.exit(main())
