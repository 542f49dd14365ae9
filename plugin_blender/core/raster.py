# SPDX-License-Identifier: GPL-3.0-or-later
"""First-frame prompts: a Blender Mask datablock (or an image) turned into one (H, W) mask per object.

OAVM needs "an initial coarse mask" per object for the first frame (paper, Sec. 3), so a hard polygon fill of
each mask layer is enough: no feather, no anti-aliasing. Each mask *layer* is one object. Its closed, filled
splines are cubic Béziers (``co`` with ``handle_left``/``handle_right``); they are flattened to polylines and
filled by a scan-line even-odd rule evaluated at pixel centres.

Coordinates follow Blender's mask space: (0, 0) is the bottom-left and (1, 1) the top-right of the frame's
*longer* side, the shorter side being centred (``BKE_mask_coord_from_frame``): on a 64x48 frame, y = 0.5 is the
middle row and y = 0.5 +- 0.375 are the top and bottom edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import MaskError

# Rec. 709 luma weights: an RGB mask image counts by its brightness
_LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


@dataclass
class BezierSpline:
    """One mask spline: ``points`` is (N, 3, 2) = per control point (handle_left, co, handle_right), mask space."""
    points: np.ndarray
    cyclic: bool = True
    fill: bool = True

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3, 2)

    @property
    def is_filled_area(self) -> bool:
        """Blender fills only closed (cyclic) splines with Fill on; open ones are strokes and cover nothing."""
        return self.cyclic and self.fill and len(self.points) >= 2


@dataclass
class MaskLayerShape:
    """One object: the splines of a mask layer, and the layer options that change its area."""
    name: str
    splines: list[BezierSpline] = field(default_factory=list)
    invert: bool = False
    fill_holes: bool = False   # Blender's "Calculate Holes": overlapping splines cut holes (even-odd across splines)


def mask_to_pixels(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mask-space (x, y) -> pixel coordinates (column, row) with rows counted from the top edge."""
    xy = np.asarray(xy, dtype=np.float64)
    x, y = xy[..., 0], xy[..., 1]
    if width >= height:
        y = (y - 0.5) * (width / height) + 0.5
    else:
        x = (x - 0.5) * (height / width) + 0.5
    return np.stack([x * width, (1.0 - y) * height], axis=-1)


def flatten_spline(spline: BezierSpline, width: int, height: int) -> np.ndarray:
    """The closed polyline (M, 2) in pixels that follows the spline's Bézier segments within about a pixel."""
    pts = mask_to_pixels(spline.points, width, height)          # (N, 3, 2): left handle, co, right handle
    n = len(pts)
    out = []
    t_cache: dict[int, np.ndarray] = {}
    for i in range(n if spline.cyclic else n - 1):
        p0, p1 = pts[i, 1], pts[i, 2]
        p2, p3 = pts[(i + 1) % n, 0], pts[(i + 1) % n, 1]
        control_length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1) + np.linalg.norm(p3 - p2)
        steps = int(min(256, max(4, math.ceil(control_length / 2.0))))
        t = t_cache.setdefault(steps, np.linspace(0.0, 1.0, steps, endpoint=False)[:, None])
        u = 1.0 - t
        out.append(u**3 * p0 + 3 * u**2 * t * p1 + 3 * u * t**2 * p2 + t**3 * p3)
    return np.concatenate(out, axis=0)


def crossing_parity(polygons: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """(H, W) int: for each pixel centre, how many polygon edges a ray to its left crosses (even-odd parity).

    Rows use a half-open rule (an edge covers row centres ``min(y0, y1) <= yc < max(y0, y1)``), so a vertex on a
    row centre is counted once and horizontal edges never.
    """
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    for poly in polygons:
        a = np.asarray(poly, dtype=np.float64)
        b = np.roll(a, -1, axis=0)
        y_lo, y_hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
        for (x0, y0), (x1, y1), lo, hi in zip(a, b, y_lo, y_hi):
            if hi == lo:
                continue
            r0, r1 = max(0, math.ceil(lo - 0.5)), min(height, math.ceil(hi - 0.5))   # rows with lo <= r+.5 < hi
            if r1 <= r0:
                continue
            yc = np.arange(r0, r1) + 0.5
            xc = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
            cols = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)   # first pixel whose centre >= crossing
            np.add.at(toggles, (np.arange(r0, r1), cols), 1)
    return np.cumsum(toggles, axis=1)[:, :width]


def rasterise_layer(layer: MaskLayerShape, width: int, height: int) -> np.ndarray:
    """(H, W) float32 in {0, 1}: the union of the layer's filled splines (or their even-odd with fill_holes)."""
    filled = [flatten_spline(s, width, height) for s in layer.splines if s.is_filled_area]
    if not filled:
        raise MaskError(f"mask layer {layer.name!r} has no closed, filled spline: close its spline (Alt+C in the "
                        f"mask editor) and keep Fill on, or remove the layer")
    if layer.fill_holes:
        inside = crossing_parity(filled, width, height) % 2 == 1
    else:
        inside = np.zeros((height, width), dtype=bool)
        for poly in filled:
            inside |= crossing_parity([poly], width, height) % 2 == 1
    if layer.invert:
        inside = ~inside
    return inside.astype(np.float32)


def rasterise_mask(layers: Sequence[MaskLayerShape], width: int, height: int) -> dict[str, np.ndarray]:
    """One prompt per layer, keyed by object id (the layer name, see object_ids_from_names).

    An empty prompt is refused here, with advice, since the service cannot track an object it was never shown.
    """
    if not layers:
        raise MaskError("the mask has no layers: add one mask layer per object and draw a closed spline in it")
    prompts: dict[str, np.ndarray] = {}
    for obj_id, layer in zip(object_ids_from_names([layer.name for layer in layers]), layers):
        mask = rasterise_layer(layer, width, height)
        if not mask.any():
            raise MaskError(f"mask layer {layer.name!r} covers no pixel of the {width}x{height} frame: draw it over "
                            f"the object (in the Movie Clip editor's mask mode, at the first frame)")
        prompts[obj_id] = mask
    return prompts


def mask_from_pixels(pixels: np.ndarray, *, use_alpha: bool, name: str) -> np.ndarray:
    """(H, W) float32 in [0, 1] from an image: its alpha channel, or its brightness (Rec. 709 luma)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    if use_alpha:
        if channels not in (2, 4):
            raise MaskError(f"image {name!r} has no alpha channel: use 'Image' instead of 'Image Alpha' as the mask "
                            f"source, or save the mask with alpha (RGBA)")
        mask = pixels[..., -1]
    else:
        mask = pixels[..., 0] if channels < 3 else pixels[..., :3] @ _LUMA
    mask = np.clip(np.nan_to_num(mask), 0.0, 1.0).astype(np.float32)
    if not (mask > 0.5).any():
        raise MaskError(f"the mask image {name!r} has no pixel above 0.5: paint the object white (or opaque) on "
                        f"black (transparent)")
    return mask


def check_prompt_sizes(prompts: Mapping[str, np.ndarray], frame_shape: tuple[int, int], what: str) -> None:
    """Refuse a prompt whose resolution differs from the clip's, naming both sizes."""
    height, width = frame_shape
    for name, mask in prompts.items():
        if tuple(mask.shape[:2]) != (height, width):
            raise MaskError(f"the mask of {name!r} ({what}) is {mask.shape[1]}x{mask.shape[0]} but the clip is "
                            f"{width}x{height}: use a mask image of the clip's resolution")


def object_ids_from_names(names: Sequence[str]) -> list[str]:
    """Object ids for EXR layer names: Blender splits channel names at '.', so dots become '_'; must be unique."""
    ids = [name.replace(".", "_").strip() or "object" for name in names]
    if len(set(ids)) != len(ids):
        raise MaskError(f"mask layers {list(names)} give duplicate object names {ids}: give each layer a unique "
                        f"name (without dots)")
    return ids
