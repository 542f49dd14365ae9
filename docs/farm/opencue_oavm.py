# SPDX-License-Identifier: GPL-3.0-or-later
"""Submit an OAVM matte job to OpenCue with PyOutline: one Shell layer, 50 frames per task.

OpenCue replaces #FRAME_START# and #FRAME_END# with each task's chunk. The chunks continue each other's clip
memory through the states `oavm batch` saves next to the outputs (see README.md); the layer's tasks are
dispatched in frame order, and a chunk whose predecessor has not finished yet steps through the missing frames
itself (same result, more time).
"""
from outline import Outline, cuerun
from outline.modules.shell import Shell

SHOT = "/mnt/projects/show/shot010"
OAVM = "/opt/oavm/.venv/bin/oavm"

outline = Outline("shot010_oavm_matte", shot="shot010", show="show")
outline.add_layer(Shell(
    "matte",
    command=[OAVM, "batch",
             "--input", f"{SHOT}/plate/plate.####.exr",
             "--mask", f"1001={SHOT}/roto/mask.1001.png",
             "--frames", "#FRAME_START#-#FRAME_END#",
             "--output", f"{SHOT}/matte/matte.####.exr",
             "--state-every", "25"],
    range="1001-1100",
    chunk=50,
    threads=1,
    tags=["gpu"],
))

if __name__ == "__main__":
    cuerun.launch(outline, use_pycuerun=False)
