# SPDX-License-Identifier: GPL-3.0-or-later
"""sRGB <-> scene-linear transfer, and mapping a plate to the display-referred range the network was trained on.

OAVM, like RVM whose backbone it starts from, learnt from display-referred 8-bit video: pixel values in [0, 1]
after the sRGB transfer curve. A linear EXR plate fed straight in looks dark and contrasty to the network and
mattes worse, so float plates are encoded with the sRGB curve (IEC 61966-2-1) first. The matte itself is
coverage, not colour, and is written back unchanged; only the network's view of the plate is converted.
"""
from __future__ import annotations

from enum import Enum
from functools import lru_cache

import numpy as np

from oavm_service.errors import OAVMInputError

# IEC 61966-2-1 piecewise curve constants.
_A = 0.055
_GAMMA = 2.4
_LINEAR_CUTOFF = 0.0031308
_ENCODED_CUTOFF = 0.04045
_SLOPE = 12.92


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


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Encode scene-linear values with the sRGB transfer curve (values above 1 stay above 1)."""
    x = np.asarray(linear, dtype=np.float32)
    x = np.maximum(x, 0.0)
    low = x * _SLOPE
    high = (1.0 + _A) * np.power(x, 1.0 / _GAMMA, dtype=np.float32) - _A
    return np.where(x <= _LINEAR_CUTOFF, low, high).astype(np.float32)


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    """Decode sRGB-encoded values to scene-linear (the exact inverse of :func:`linear_to_srgb` on [0, inf))."""
    x = np.asarray(encoded, dtype=np.float32)
    x = np.maximum(x, 0.0)
    low = x / _SLOPE
    high = np.power((x + _A) / (1.0 + _A), _GAMMA, dtype=np.float32)
    return np.where(x <= _ENCODED_CUTOFF, low, high).astype(np.float32)


def resolve_colorspace(requested: InputColorspace, *, is_float: bool) -> InputColorspace:
    """``auto`` -> linear for float/half data (EXR, float TIFF), display for integer data (JPEG, PNG, DPX)."""
    if requested is InputColorspace.AUTO:
        return InputColorspace.LINEAR if is_float else InputColorspace.DISPLAY
    return requested


def to_network_rgb(rgb: np.ndarray, colorspace: InputColorspace) -> np.ndarray:
    """The (H, W, 3) float32 frame in [0, 1], display-referred, that the engine expects.

    Non-finite values (NaN/inf pixels are common in CG renders) become 0 so that one bad pixel does not stop a
    farm job; highlights above 1 are clipped, since the network has only ever seen [0, 1].
    """
    if colorspace is InputColorspace.AUTO:
        raise ValueError("resolve 'auto' with resolve_colorspace() before converting")
    if rgb.dtype == np.float16:   # a half-float plate: one lookup per pixel, the very values computed below
        return _half_table(colorspace)[np.ascontiguousarray(rgb).view(np.uint16)]
    x = np.nan_to_num(np.asarray(rgb, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if colorspace is InputColorspace.LINEAR:
        x = linear_to_srgb(x)
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


@lru_cache(maxsize=None)
def _half_table(colorspace: InputColorspace) -> np.ndarray:
    """:func:`to_network_rgb` of every float16 value, indexed by its 16 bits. Half-float EXR plates are the farm's
    usual input, and the sRGB curve's ``power`` made the conversion of a 1080p frame 112 ms on this project's CPU
    (the network step is ~260 ms); through the table, float16 cast included, it takes 44 ms, same values."""
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return to_network_rgb(every_half, colorspace)
