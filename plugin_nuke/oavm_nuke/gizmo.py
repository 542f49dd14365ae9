# SPDX-License-Identifier: GPL-3.0-or-later
"""The names OAVM.gizmo and the Python layer share: its user knobs and the internal nodes the layer drives.

Kept in one place so that a renamed knob breaks a test (tests/test_gizmo_file.py checks the .gizmo against this
table) instead of an artist's session.
"""
from __future__ import annotations

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5590"   # = shared.protocol.DEFAULT_ENDPOINT (not imported: no pyzmq needed here)

# user knob -> the Nuke Python class it has in the gizmo (and the addUserKnob type id that makes it)
KNOBS = {
    "endpoint": "String_Knob",
    "clip_id": "String_Knob",
    "frame_range": "String_Knob",
    "cache_dir": "File_Knob",
    "mask_channel": "Link_Knob",        # links MaskToAlpha.from0, a Channel_Knob: which Mask channel is the mask
    "output": "Enumeration_Knob",
    "premultiply": "Boolean_Knob",
    "analyze": "PyScript_Knob",
    "reprompt": "PyScript_Knob",
    "clear_reprompts": "PyScript_Knob",
    "status": "Text_Knob",
    "cache_ready": "Boolean_Knob",      # hidden: set after an analysis, switches the output to the cached matte
}
KNOB_TYPE_IDS = {"String_Knob": 1, "File_Knob": 2, "Enumeration_Knob": 4, "Boolean_Knob": 6, "Tab_Knob": 20,
                 "PyScript_Knob": 22, "Text_Knob": 26, "Link_Knob": 41}
OUTPUT_CHOICES = ("rgba.alpha", "oavm layer")   # the output knob's values (an oavm layer holds alpha + fgmask)

# internal node -> class. SourceOut/MaskOut are where the layer attaches its temporary Write nodes.
NODES = {
    "Source": "Input",
    "Mask": "Input",
    "SourceCrop": "Crop",
    "SourceOut": "Dot",
    "MaskToAlpha": "Copy",
    "MaskCrop": "Crop",
    "MaskOut": "Dot",
    "MatteRead": "Read",
    "CopyAlpha": "Copy",
    "PremultAlpha": "Premult",
    "CopyLayer": "Copy",
    "PremultLayer": "Premult",
    "OutputSwitch": "Switch",
    "ReadySwitch": "Switch",
    "Output1": "Output",
}
MATTE_READ = "MatteRead"
SOURCE_OUT = "SourceOut"
MASK_OUT = "MaskOut"
