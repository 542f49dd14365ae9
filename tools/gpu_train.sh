#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# One GPU machine session of training (a lent GPU is short-lived): the CUDA training test, then
# configs/local_gpu.toml from the data pack, for MINUTES minutes at most. Brings back into $OUT what fits the
# machine's return limits (the fp16 checkpoints, logs, scalars, the last sample sheet; last.pt is 70 MB and stays).
# Before: `oavm pack-data --config configs/local_gpu.toml --out packs/local` here; wheels the machine lacks
# (openimageio, pyzmq) in .whl_train/. Carry packs/local and .whl_train.
set -u
OUT=${OUT:-/tmp/oavm-gpu-train}
MINUTES=${MINUTES:-4}
RUN=/tmp/oavm-run
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl_train/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl_train/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_train_resume.py -k cuda 2>&1 | tail -5 | tee "$OUT/cuda_test.txt"
timeout $((MINUTES * 60 + 60)) python3 -m oavm_service train --config configs/local_gpu.toml --data-pack packs/local \
    --device cuda --out "$RUN" --max-minutes "$MINUTES" 2>&1 | grep -v '^\s*$' | tail -40
for f in best.safetensors final.safetensors train.log scalars.csv; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
last=$(ls "$RUN"/samples/*.png 2>/dev/null | tail -1); [ -n "$last" ] && cp "$last" "$OUT/"
ls -la "$OUT"
