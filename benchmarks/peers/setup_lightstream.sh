#!/usr/bin/env bash
# A separate virtual environment with lightstream 1.0.7, the peer library of
# benchmarks/vs_lightstream.py, so that it never becomes a dependency of ours.
#
#   bash benchmarks/peers/setup_lightstream.sh [VENV_DIR]
#
# VENV_DIR defaults to results/peers/venv-lightstream (results/ is git-ignored).
# It installs torch==2.13.0 (pinned: the local CPU build, never a CUDA download),
# lightstream==1.0.7, and lightning (pinned to the version measured) and numpy, which lightstream imports without
# declaring them (its package __init__ imports lightning; scnn.py imports numpy).
# torchvision is not installed: only lightstream's model zoo and plotting helpers import
# it, and the benchmark defines its networks itself.
#
# Then it applies the CPU patch (benchmarks/peers/patch_lightstream_cpu.py): lightstream's
# StreamingCNN moves the trunk to CUDA with a hard-coded `.cuda()` after computing its tile
# statistics on the CPU; the patch keeps the trunk on the CPU when CUDA is not available.
# Nothing else is changed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/results/peers/venv-lightstream}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "$TORCH_PIN"
"$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" "lightstream==1.0.7" "lightning==2.6.6" numpy
"$VENV/bin/python" "$HERE/patch_lightstream_cpu.py"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import lightstream.core.scnn.scnn  # noqa: F401  (imports lightning through the package __init__)
print(f"lightstream {md.version('lightstream')}, torch {torch.__version__}, lightning {md.version('lightning')}")
PY
echo "peer venv ready: $VENV/bin/python"
