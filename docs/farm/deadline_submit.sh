#!/bin/sh
# SPDX-License-Identifier: GPL-3.0-or-later
# Submit an OAVM matte job to Thinkbox Deadline (CommandLine plug-in), 50 frames per task.
# Deadline replaces <STARTFRAME>/<ENDFRAME> in the arguments with each task's chunk.
# MachineLimit=1 keeps the chunks on one machine at a time, in order, so every chunk continues from the clip state
# the previous one saved (see README.md; chunks out of order would still be correct, only slower).
set -eu
SHOT=${SHOT:-/mnt/projects/show/shot010}
OAVM=${OAVM:-/opt/oavm/.venv/bin/oavm}
FRAMES=${FRAMES:-1001-1100}
KEY=${KEY:-1001}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/job_info.job" <<JOB
Plugin=CommandLine
Name=$(basename "$SHOT") OAVM matte
Frames=$FRAMES
ChunkSize=50
Pool=gpu
MachineLimit=1
OutputDirectory0=$SHOT/matte
JOB

cat > "$tmp/plugin_info.job" <<PLUGIN
Executable=$OAVM
Arguments=batch --input "$SHOT/plate/plate.####.exr" --mask $KEY=$SHOT/roto/mask.$KEY.png --frames <STARTFRAME>-<ENDFRAME> --output "$SHOT/matte/matte.####.exr" --state-every 25
Shell=default
ShellExecute=False
PLUGIN

deadlinecommand "$tmp/job_info.job" "$tmp/plugin_info.job"

# The same as a one-liner (then set the Machine Limit in the Monitor):
#   deadlinecommand -SubmitCommandLineJob -name "shot010 OAVM matte" -executable "$OAVM" \
#     -arguments "batch --input <QUOTE>$SHOT/plate/plate.####.exr<QUOTE> --mask $KEY=$SHOT/roto/mask.$KEY.png --frames <STARTFRAME>-<ENDFRAME> --output <QUOTE>$SHOT/matte/matte.####.exr<QUOTE>" \
#     -frames "$FRAMES" -chunksize 50 -pool gpu
