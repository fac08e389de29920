"""Patch the installed lightstream 1.0.7 so that its StreamingCNN runs on a CPU-only machine.

Run it with the peer venv's python (``setup_lightstream.sh`` does). It is idempotent and
refuses to touch a file whose text differs from the release it was written for.

The one change, in ``lightstream/core/scnn/scnn.py``, ``StreamingCNN._configure``:
with ``statistics_on_cpu=True`` (the default of ``StreamingConstructor`` and so of
``StreamingModule``) the tile statistics are gathered on the CPU and then the trunk is
moved to CUDA unconditionally::

    if self.statistics_on_cpu:
        self.stream_module = self.stream_module.cuda()
        self.device = torch.device("cuda")  # type:ignore

which raises "Torch not compiled with CUDA enabled" on a CPU build. The patch moves it to
CUDA only when CUDA is available, and otherwise leaves it on the CPU. On a machine with
CUDA the behaviour is unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

ORIGINAL = (
    "        if self.statistics_on_cpu:\n"
    "            self.stream_module = self.stream_module.cuda()\n"
    '            self.device = torch.device("cuda")  # type:ignore\n'
)
PATCHED = (
    "        if self.statistics_on_cpu:\n"
    '            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU patch (lightning_streaming benchmarks)\n'
    "            self.stream_module = self.stream_module.to(self.device)\n"
)


def patch_text(text: str) -> tuple[str, bool]:
    """The patched text of scnn.py and whether it changed; raises if neither form is found."""
    if PATCHED in text:
        return text, False
    if text.count(ORIGINAL) != 1:
        raise RuntimeError("scnn.py does not contain the expected lightstream 1.0.7 lines; not patching")
    return text.replace(ORIGINAL, PATCHED), True


def main() -> int:
    import lightstream.core.scnn.scnn as scnn  # the installed peer

    path = Path(scnn.__file__)
    text, changed = patch_text(path.read_text())
    if changed:
        path.write_text(text)
    print(f"{'patched' if changed else 'already patched'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
