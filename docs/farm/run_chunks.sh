#!/bin/sh
# SPDX-License-Identifier: GPL-3.0-or-later
# Run a shot in chunks on this machine, the way a farm would, stopping at the first failing chunk.
# usage: run_chunks.sh FIRST LAST CHUNK -- <oavm batch options without --frames>
# e.g.   run_chunks.sh 1001 1100 50 -- --input 'plate.####.exr' --mask 1001=mask.png --output 'out/m.####.exr'
set -eu
first=$1 last=$2 chunk=$3
shift 3
[ "${1:-}" = "--" ] && shift
start=$first
while [ "$start" -le "$last" ]; do
    end=$((start + chunk - 1))
    [ "$end" -gt "$last" ] && end=$last
    echo "== chunk $start-$end"
    oavm batch --frames "$start-$end" "$@" || { code=$?; echo "chunk $start-$end failed with exit code $code"; exit "$code"; }
    start=$((end + 1))
done
