# SPDX-License-Identifier: GPL-3.0-or-later
"""The OAVM network (paper Section 3): see docs/model.md for the map "paper equation -> file/function"."""
from .config import OAVMConfig
from .oavm import OAVM, FrameFeatures, ObjectState
from .oqg import OQGOutput
from .pfe import Memory

__all__ = ["OAVM", "OAVMConfig", "FrameFeatures", "ObjectState", "OQGOutput", "Memory"]
