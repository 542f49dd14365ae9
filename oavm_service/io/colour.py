# SPDX-License-Identifier: GPL-3.0-or-later
"""How a plate becomes the network's frame: which colour space its pixels are in, and the conversion.

The frame on the wire is display-referred RGB in [0, 1]; the sRGB curve that makes it from a scene-linear plate
lives in ``shared/colour.py``, the one definition the service and both plug-ins use. This module adds what only
the service needs: the ``--input-colorspace`` choice and its ``auto`` rule.
"""
from __future__ import annotations

from enum import Enum

import numpy as np

from oavm_service.errors import OAVMInputError
from shared.colour import display_frame, linear_to_srgb, srgb_to_linear

__all__ = ["InputColorspace", "linear_to_srgb", "resolve_colorspace", "srgb_to_linear", "to_network_rgb"]


class InputColorspace(str, Enum):
    """What the input pixels are; ``auto`` decides per file (float data -> linear, integer data -> display)."""

    AUTO = "auto"
    LINEAR = "linear"      # scene-linear (typical EXR plate): apply the sRGB transfer
    DISPLAY = "display"    # already display-referred (JPEG, PNG, 8/10/16-bit video frames, movies): use as is

    @classmethod
    def parse(cls, text: str) -> "InputColorspace":
        try:
            return cls(text.lower())
        except ValueError:
            raise OAVMInputError(
                f"unknown input colorspace {text!r}; use 'auto' (float files are linear, others display), "
                "'linear' (scene-linear plates) or 'display' (already sRGB/Rec.709 encoded).") from None


def resolve_colorspace(requested: InputColorspace, *, is_float: bool) -> InputColorspace:
    """``auto`` -> linear for float/half data (EXR, float TIFF), display for integer data (JPEG, PNG, DPX)."""
    if requested is InputColorspace.AUTO:
        return InputColorspace.LINEAR if is_float else InputColorspace.DISPLAY
    return requested


def to_network_rgb(rgb: np.ndarray, colorspace: InputColorspace) -> np.ndarray:
    """The (H, W, 3) float32 frame in [0, 1], display-referred, that the engine expects
    (:func:`shared.colour.display_frame`: non-finite values 0, highlights clipped, half plates through a table)."""
    if colorspace is InputColorspace.AUTO:
        raise ValueError("resolve 'auto' with resolve_colorspace() before converting")
    return display_frame(rgb, colorspace is InputColorspace.LINEAR)
