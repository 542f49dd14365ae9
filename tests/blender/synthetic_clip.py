# SPDX-License-Identifier: GPL-3.0-or-later
"""The synthetic clip of the Blender suite: a bright disc moving over noise, written as 8-bit PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenImageIO as oiio

WIDTH, HEIGHT, FRAMES = 64, 48, 6


def write_png(path: Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> an 8-bit PNG, written with OpenImageIO."""
    height, width = rgb.shape[:2]
    buf = oiio.ImageBuf(oiio.ImageSpec(width, height, 3, oiio.UINT8))
    buf.set_pixels(oiio.ROI(), np.ascontiguousarray(rgb))
    assert buf.write(str(path)), buf.geterror()


def disc_frames(frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright disc of radius 12 px moving 3 px right per frame over noise."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for t in range(frames):
        inside = np.hypot(yy + 0.5 - 24, xx + 0.5 - (22 + 3 * t)) < 12
        out.append(np.where(inside[..., None], [230, 180, 60], background))
    return np.stack(out).astype(np.uint8)


# The rectangle around the disc of frame 1 (centre x 22, y 24, radius 12 px) in Blender mask space (x over the
# width, y scaled by W/H about 0.5), and the same rectangle as pixels: columns 10..33, rows 12..35.
RECT = (10 / 64, 0.3125, 34 / 64, 0.6875)
# ... and around the disc of frame 4 (moved 9 px right): columns 19..42
RECT_FRAME4 = (19 / 64, 0.3125, 43 / 64, 0.6875)


def rect_mask(col0: int = 10, col1: int = 34, row0: int = 12, row1: int = 36) -> np.ndarray:
    """A (H, W) rectangle prompt: rows row0..row1-1, columns col0..col1-1 (default: RECT)."""
    mask = np.zeros((HEIGHT, WIDTH), np.float32)
    mask[row0:row1, col0:col1] = 1
    return mask


def direct_mattes(endpoint: str, plates: Path, clip_id: str, frames: list[int],
                  prompts: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """The reference: the same frames (read here with OpenImageIO) through the client directly.

    Returns ``{frame: {object: alpha}}``; the add-on's EXRs must hold these values.
    """
    from shared import OAVMClient

    out = {}
    with OAVMClient(endpoint, timeout_s=120) as client:
        for i, f in enumerate(frames):
            rgb = oiio.ImageBuf(str(plates / f"plate_{f:04d}.png")).get_pixels(oiio.UINT8)[..., :3]
            reply = (client.open_clip(clip_id, f, rgb, prompts, restart=True) if i == 0
                     else client.matte(clip_id, f, rgb))
            out[f] = {obj: np.array(layer["alpha"]) for obj, layer in reply.layers.items()}
        client.close_clip(clip_id)
    return out
