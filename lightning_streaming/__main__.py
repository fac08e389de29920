"""``python -m lightning_streaming``: the ``lightning-streaming`` command."""

import sys

from .cli import main

sys.exit(main())
