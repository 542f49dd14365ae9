# SPDX-License-Identifier: GPL-3.0-or-later
"""Training-clip composition: foreground + alpha over background, motion for stills, SFM and prompt corruption.

Everything here works on numpy arrays in the layout the loaders produce and takes an explicit
``numpy.random.Generator``: a clip is a pure function of (source data, generator state), which is what makes
``oavm train --resume`` continue exactly.

Layouts: colour sequences ``(T, H, W, 3)`` float32 in 0..1, alpha / mask sequences ``(T, H, W)`` float32 in 0..1.

* :func:`composite` is the matting equation (Eq. 1 of the paper).
* :func:`sequential_foreground_merging` is the paper's Sequential Foreground Merging (Section 3.5, Eq. 8-10).
* :func:`animate_still` turns a still image (COCO, BG20K, a single matte) into a short clip by affine drift, zoom
  and motion blur, as RVM does for its image datasets.
* :func:`corrupt_prompt` makes a first-frame mask look like an off-the-shelf segmenter's output (Section 4.1: the
  coarse mask comes from Mask R-CNN), so the network learns not to trust its boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "SFMConfig", "SFMResult", "composite", "sequential_foreground_merging",
    "MotionConfig", "animate_still", "PromptNoiseConfig", "corrupt_prompt", "binarize",
]


def binarize(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``M = alpha > threshold`` as float32: the paper's instance targets and segmentation masks (Section 3.5)."""
    return (alpha > threshold).astype(np.float32)


def composite(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The matting equation ``I = alpha * F + (1 - alpha) * B`` (Eq. 1), frame by frame."""
    a = alpha[..., None]
    return (a * fg + (1.0 - a) * bg).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Sequential Foreground Merging (Section 3.5)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFMConfig:
    """The two probabilities of Sequential Foreground Merging; the paper uses p1 = 0.4, p2 = 0.5 (Section 4.1)."""

    p1: float = 0.4  # probability of merging a second foreground {F2} into the background first (Eq. 8)
    p2: float = 0.5  # probability that the target is {alpha1} alone rather than the union (Eq. 10)


@dataclass
class SFMResult:
    """A composed clip and its supervision."""

    image: np.ndarray          # {I_n}: (T, H, W, 3), Eq. 9
    alpha: np.ndarray          # {alpha_GT}: (T, H, W), Eq. 10
    foreground: np.ndarray     # straight colour of the target layer alpha_GT, (T, H, W, 3)
    instances: list[np.ndarray] = field(default_factory=list)  # [{M_1}, {M_2}?], each (T, H, W) in {0, 1}
    merged: bool = False       # whether {F2} was merged into the background (the p1 branch)
    union_target: bool = False  # whether alpha_GT is the union 1 - (1 - a1)(1 - a2) (the 1 - p2 branch)


def sequential_foreground_merging(
    fg1: np.ndarray, alpha1: np.ndarray, bg: np.ndarray,
    fg2: np.ndarray | None = None, alpha2: np.ndarray | None = None,
    *, rng: np.random.Generator, config: SFMConfig = SFMConfig(),
) -> SFMResult:
    """Compose ``{F1, alpha1}`` over ``{B}``, first merging ``{F2, alpha2}`` into ``{B}`` with probability p1.

    With probability p1 (and when a second foreground is given) the background becomes
    ``B_n = alpha2 * F2 + (1 - alpha2) * B`` (Eq. 8) and the clip ``I_n = alpha1 * F1 + (1 - alpha1) * B_n`` (Eq. 9).
    The matting target is then ``alpha1`` with probability p2, else the union ``1 - (1 - alpha1)(1 - alpha2)``
    (Eq. 10); the instance targets are ``M_i = alpha_i > 0.5`` for every foreground in the clip.

    The random draws are made in a fixed order (merge?, then union?) so that a seeded generator reproduces them.
    """
    _check_same_shape(fg1, alpha1, bg, "fg1/alpha1/bg")
    merge = bool(rng.random() < config.p1)
    union = bool(rng.random() >= config.p2)
    if not merge or fg2 is None or alpha2 is None:
        return SFMResult(image=composite(fg1, alpha1, bg), alpha=alpha1.astype(np.float32),
                         foreground=fg1.astype(np.float32), instances=[binarize(alpha1)])
    _check_same_shape(fg2, alpha2, bg, "fg2/alpha2/bg")
    background = composite(fg2, alpha2, bg)                        # Eq. 8
    image = composite(fg1, alpha1, background)                     # Eq. 9
    instances = [binarize(alpha1), binarize(alpha2)]
    if not union:                                                  # Eq. 10, first case (probability p2)
        return SFMResult(image, alpha1.astype(np.float32), fg1.astype(np.float32), instances, True, False)
    alpha = 1.0 - (1.0 - alpha1) * (1.0 - alpha2)                  # Eq. 10, second case (probability 1 - p2)
    return SFMResult(image, alpha.astype(np.float32), _union_foreground(fg1, alpha1, fg2, alpha2, alpha),
                     instances, True, True)


def _union_foreground(fg1, alpha1, fg2, alpha2, alpha) -> np.ndarray:
    """Straight colour F_u of the merged layer, so that ``I = A F_u + (1 - A) B`` with ``A`` the union alpha."""
    a1, a2, a = alpha1[..., None], alpha2[..., None], alpha[..., None]
    premultiplied = a1 * fg1 + (1.0 - a1) * a2 * fg2
    return np.where(a > 1e-6, premultiplied / np.maximum(a, 1e-6), fg1).astype(np.float32)


def _check_same_shape(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, what: str) -> None:
    if fg.ndim != 4 or fg.shape[-1] != 3 or alpha.shape != fg.shape[:3] or bg.shape != fg.shape:
        raise ValueError(f"{what}: expected (T, H, W, 3), (T, H, W), (T, H, W, 3); got {fg.shape}, {alpha.shape}, "
                         f"{bg.shape}. Resize/crop all sequences of a clip to one size and length first.")


# ---------------------------------------------------------------------------------------------------------------
# Motion for still images
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MotionConfig:
    """How far a still may drift over one clip (fractions of the frame size) and how likely motion blur is."""

    max_shift: float = 0.10      # total translation over the clip, fraction of width/height
    max_zoom: float = 0.15       # total relative change of scale over the clip (zoom in or out)
    max_rotate_deg: float = 5.0  # total rotation over the clip
    blur_probability: float = 0.3
    max_blur_px: int = 7         # longest motion-blur streak, pixels


def animate_still(images: list[np.ndarray], length: int, *, rng: np.random.Generator,
                  config: MotionConfig = MotionConfig()) -> list[np.ndarray]:
    """Make ``length`` frames of each still by one shared random camera path (affine drift + zoom + rotation).

    ``images`` are arrays of one size ``(H, W)`` or ``(H, W, C)`` (e.g. a foreground, its alpha); all get the same
    motion so they stay aligned. The path interpolates linearly from the identity to a random end transform, and
    motion blur (with probability ``blur_probability``) streaks along the per-frame displacement, like a moving
    camera. Returns one ``(length, ...)`` array per input.
    """
    h, w = images[0].shape[:2]
    shift = rng.uniform(-config.max_shift, config.max_shift, size=2) * np.array([h, w])
    zoom = 1.0 + rng.uniform(-config.max_zoom, config.max_zoom)
    angle = math.radians(rng.uniform(-config.max_rotate_deg, config.max_rotate_deg))
    blur = bool(rng.random() < config.blur_probability)
    outs: list[list[np.ndarray]] = [[] for _ in images]
    for t in range(length):
        s = t / max(length - 1, 1)
        matrix, offset = _affine(h, w, shift * s, 1.0 + (zoom - 1.0) * s, angle * s)
        for out, image in zip(outs, images):
            frame = _warp(image, matrix, offset)
            if blur and length > 1:
                frame = _motion_blur(frame, shift / (length - 1), config.max_blur_px)
            out.append(frame)
    return [np.stack(o).astype(np.float32) for o in outs]


def _affine(h: int, w: int, shift: np.ndarray, zoom: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Output->input mapping for scipy's affine_transform: rotate/zoom about the centre, then translate."""
    c, s = math.cos(angle), math.sin(angle)
    forward = zoom * np.array([[c, -s], [s, c]])
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - inverse @ (centre + shift)
    return inverse, offset


def _warp(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear warp with edge replication (no black borders that the network could learn to key on)."""
    if image.ndim == 2:
        return ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    return np.stack([ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode="nearest")
                     for c in range(image.shape[-1])], axis=-1)


def _motion_blur(image: np.ndarray, velocity: np.ndarray, max_px: int) -> np.ndarray:
    """Average along the direction of motion, streak length = per-frame displacement (at most ``max_px``)."""
    length = int(min(max_px, round(float(np.hypot(*velocity)))))
    if length < 2:
        return image
    direction = velocity / (np.hypot(*velocity) + 1e-9)
    kernel = np.zeros((length, length), np.float32)
    centre = (length - 1) / 2.0
    for i in range(length):
        y, x = centre + (i - centre) * direction
        kernel[int(round(y)), int(round(x))] = 1.0
    kernel /= kernel.sum()
    if image.ndim == 2:
        return ndimage.convolve(image, kernel, mode="nearest")
    return np.stack([ndimage.convolve(image[..., c], kernel, mode="nearest") for c in range(image.shape[-1])], -1)


# ---------------------------------------------------------------------------------------------------------------
# First-frame prompt corruption
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptNoiseConfig:
    """Errors a segmenter makes on the first-frame mask; each applies independently with its probability."""

    morph_probability: float = 0.8   # erode or dilate the whole mask
    max_morph_px: int = 4
    hole_probability: float = 0.3    # punch holes into the object
    blob_probability: float = 0.3    # add false-positive blobs near the object
    max_blobs: int = 3
    shift_probability: float = 0.3   # misalign by a few pixels
    max_shift_px: int = 4


def corrupt_prompt(mask: np.ndarray, *, rng: np.random.Generator,
                   config: PromptNoiseConfig = PromptNoiseConfig()) -> np.ndarray:
    """Return a coarse, plausibly wrong version of the binary ``(H, W)`` ``mask``: the prompt the network sees.

    Never returns an empty mask for a non-empty input: an empty prompt would teach the network to matte nothing.
    """
    clean = mask > 0.5
    out = clean.copy()
    if rng.random() < config.morph_probability:
        px = int(rng.integers(1, config.max_morph_px + 1))
        op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
        out = op(out, iterations=px)
    if rng.random() < config.hole_probability:
        out &= ~_random_ellipses(out, rng, int(rng.integers(1, config.max_blobs + 1)), inside=True)
    if rng.random() < config.blob_probability:
        out |= _random_ellipses(out, rng, int(rng.integers(1, config.max_blobs + 1)), inside=False)
    if rng.random() < config.shift_probability:
        dy, dx = rng.integers(-config.max_shift_px, config.max_shift_px + 1, size=2)
        out = ndimage.shift(out.astype(np.uint8), (int(dy), int(dx)), order=0, mode="constant") > 0
    if clean.any() and not out.any():
        out = clean
    return out.astype(np.float32)


def _random_ellipses(mask: np.ndarray, rng: np.random.Generator, count: int, *, inside: bool) -> np.ndarray:
    """Small ellipses centred inside the object (holes) or within a band around it (false-positive blobs)."""
    h, w = mask.shape
    region = mask if inside else (ndimage.binary_dilation(mask, iterations=max(2, min(h, w) // 16)) & ~mask)
    ys, xs = np.nonzero(region)
    result = np.zeros_like(mask, dtype=bool)
    if ys.size == 0:
        return result
    area = max(int(mask.sum()), 1)
    radius_max = max(2.0, math.sqrt(area) / 6.0)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(count):
        i = int(rng.integers(ys.size))
        ry, rx = rng.uniform(1.0, radius_max, size=2)
        result |= ((yy - ys[i]) / ry) ** 2 + ((xx - xs[i]) / rx) ** 2 <= 1.0
    return result
