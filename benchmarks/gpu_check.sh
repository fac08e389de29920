#!/usr/bin/env bash
# GPU readiness, in under 8 minutes on one CUDA machine (never part of CI):
#  1. CUDA peak memory and step time of the benchmark trunks (Table I, VGG-like, ResNet-18
#     and ResNet-50 bodies) at 2048² and 4096², float32, bf16-mixed and 16-mixed,
#     conventional against streamed within half the conventional peak (gpu_check.py);
#  2. with two or more GPUs, a 2-process NCCL run of examples/train_classifier.py
#     ("streaming_ddp", 16-mixed).
# Fails fast, with a message, where CUDA is not available.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make venv`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -lt 1 ]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False, torch $("$PY" -c 'import torch; print(torch.__version__)')); run it on a machine with a GPU and a CUDA build of PyTorch" >&2
    exit 2
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| GPUs:', torch.cuda.device_count(), '| torch', torch.__version__)"

# 1. Memory and time (about 5 minutes at most: gpu_check.py stops starting measurements after --time-limit).
timeout 390 "$PY" benchmarks/gpu_check.py --time-limit 300 "$@" | tee "$OUT/gpu_check.md"

# 2. Two processes over NCCL (Lightning's DDP backend on CUDA), if there are two GPUs.
if [ "$gpus" -ge 2 ]; then
    echo "## 2-process NCCL run: examples/train_classifier.py --devices 2 --accelerator gpu --precision 16-mixed"
    timeout 90 "$PY" examples/train_classifier.py --accelerator gpu --devices 2 --precision 16-mixed --size 2048 \
        --tile 1024 --steps 10 --threads 0 2>&1 | tee "$OUT/gpu_ddp.txt" | tail -n 5
else
    echo "## 2-process NCCL run: skipped (one GPU)"
fi
