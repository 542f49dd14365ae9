# SPDX-License-Identifier: GPL-3.0-or-later
"""Frames and masks as the client sends them, read from the EXR files Nuke's Write nodes render.

The service expects display-referred RGB in [0, 1] (the network learnt from sRGB video); a Write node writes
Nuke's scene-linear working space. When the service reads a file itself (``matte_file``) it applies the sRGB curve
to float data; when the gizmo sends pixels (the first frame, re-prompts, a remote service) it applies the same
curve here, ``shared/colour.py`` for both, so one clip is never seen in two colour encodings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .cache import pixel_digest
from .exr import ExrError, ExrImage, read_exr, stored_pixels_digest


def linear_to_display(rgb: np.ndarray) -> np.ndarray:
    """Scene-linear -> sRGB-encoded [0, 1] float32, NaN/inf made finite and highlights clipped as the service does."""
    from shared.colour import display_frame     # imported here: the core stays importable alone
    return display_frame(rgb, linear=True)


def _missing(path: str, what: str) -> ExrError:
    return ExrError("the %s render %s is missing: the Write node did not produce it (check the Script Editor for "
                    "Nuke's render error)" % (what, path))


def _read(path: str, what: str, keep_half: bool = False) -> ExrImage:
    try:
        return read_exr(path, keep_half=keep_half)
    except FileNotFoundError:
        raise _missing(path, what) from None


@dataclass
class SourceFrame:
    path: str
    linear: np.ndarray        # (H, W, 3) the Write node's scene-linear pixels over the display window, as stored
                              # (float16 from a half render, else float32)
    full_window: bool         # data window == display window: the service may read the file itself
    _display: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """The cache key's part for this frame, :func:`source_digest` of the file. Read only when asked: the
        analysis keys every frame before it decides to send one as pixels, so decoding does not key it again."""
        return source_digest(self.path)[0]

    @property
    def display(self) -> np.ndarray:
        """The same pixels display-referred, float32: what the service's network sees. Made when first asked for
        (most frames are only keyed here; the service reads the file itself); a half render through the curve's
        table (shared/colour.py)."""
        if self._display is None:
            self._display = linear_to_display(self.linear)
        return self._display


def source_digest(path: str) -> Tuple[str, bool]:
    """``(digest, full_window)`` of a rendered Source frame without decoding it: what the cache key needs of every
    frame (the service reads the file itself). The digest is of the pixel data as the Write node stored it
    (:func:`~.exr.stored_pixels_digest`); decoding and hashing the pixels took 177 ms at 1080p, most of the
    gizmo's own time per frame, this 4 ms."""
    try:
        return stored_pixels_digest(path)
    except FileNotFoundError:
        raise _missing(path, "Source") from None


def load_source(path: str) -> SourceFrame:
    """A rendered Source frame, decoded (for frames sent as pixels). ``full_window`` is False when Nuke wrote a
    bounding box other than the format (the service reads a file's data window, the gizmo works on the format);
    such frames go as pixels."""
    raw = _read(path, "Source", keep_half=True)
    image = raw.in_display_window()
    rgb = np.stack([image.channel("R", "rgba.red"), image.channel("G", "rgba.green"),
                    image.channel("B", "rgba.blue")], axis=-1)
    return SourceFrame(path, rgb, raw.data_window == raw.display_window)


def load_mask(path: str) -> Tuple[np.ndarray, str]:
    """``(mask in [0, 1], digest)`` of a rendered Mask frame (the gizmo copies the chosen channel into alpha)."""
    image = _read(path, "Mask").in_display_window()
    mask = np.clip(np.nan_to_num(image.channel("A", "rgba.alpha")), 0.0, 1.0).astype(np.float32)
    if not np.any(mask > 0.5):
        raise ExrError("the Mask input is empty at this frame (%s): draw the object's first-frame mask (e.g. with a "
                       "Roto node) into the channel chosen in 'mask channel'" % path)
    return mask, pixel_digest(mask)
