# SPDX-License-Identifier: GPL-3.0-or-later
"""Video-matting metrics with the RVM benchmark's definitions and scales, plus DAVIS J and boundary F.

Alpha metrics (soft ground truth), as RVM's ``evaluation/evaluate_*.py`` computes them, so that our numbers can
be put next to the paper's Tables 1-2:

========  ===========================================================================  =========
metric    per frame (``p`` prediction, ``g`` ground truth, both in [0, 1])             scale
========  ===========================================================================  =========
MAD       mean |p - g|                                                                 x 1e3
MSE       mean (p - g)^2                                                               x 1e3
Grad      sum over pixels of (|grad_s(norm p)| - |grad_s(norm g)|)^2, Gaussian-
          derivative filters with sigma = 1.4, ``norm`` = min-max to [0, 1]            x 1e-3
Conn      sum over pixels of |phi(p) - phi(g)| (connectivity, threshold step 0.1)      x 1e-3
dtSSD     sqrt(mean(((p_t - p_{t-1}) - (g_t - g_{t-1}))^2)) per frame pair             x 1e2
========  ===========================================================================  =========

Segmentation metrics (binary ground truth, e.g. DAVIS), on ``alpha > 0.5``:

* J: intersection over union with the GT mask (1 when both are empty, as DAVIS).
* F: DAVIS boundary F-measure: boundary pixels of each mask count as matched when the other mask has a boundary
  pixel within ``ceil(0.008 * image diagonal)`` pixels; F = 2PR / (P + R).

Everything here is numpy/scipy on float64 so that results do not depend on torch or on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from oavm_service.errors import OAVMInputError

GRAD_SIGMA = 1.4
CONN_STEP = 0.1
CONN_MIN_DIFF = 0.15          # RVM / Adobe: only round-down differences >= 0.15 count as disconnected
BOUNDARY_TOLERANCE = 0.008    # DAVIS: fraction of the image diagonal
BINARY_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------------- checks

def _frame_pair(pred: np.ndarray, gt: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as float64 (H, W) in [0, 1]; a clear error for anything else."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 2 or gt.ndim != 2:
        raise OAVMInputError(f"{what} takes one frame as (H, W) arrays; got prediction {pred.shape} and ground "
                             f"truth {gt.shape}. Drop a channel axis with a[..., 0] or loop over frames.")
    return _check_same(pred, gt, what)


def _clip_pair(pred: np.ndarray, gt: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both clips as float64 (T, H, W) in [0, 1]."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 3 or gt.ndim != 3:
        raise OAVMInputError(f"{what} takes a clip as (T, H, W) arrays; got prediction {pred.shape} and ground "
                             f"truth {gt.shape}.")
    return _check_same(pred, gt, what)


def _check_same(pred: np.ndarray, gt: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != gt.shape:
        raise OAVMInputError(f"{what}: prediction {pred.shape} and ground truth {gt.shape} differ in shape; "
                             "resize the prediction to the ground truth's resolution first.")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not np.isfinite(a).all():
            raise OAVMInputError(f"{what}: the {name} contains NaN or infinity.")
        if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
            raise OAVMInputError(f"{what}: the {name} has values in [{a.min():.3g}, {a.max():.3g}]; alpha must be "
                                 "in [0, 1] (divide 8-bit images by 255, 16-bit by 65535).")
    return pred, gt


# ------------------------------------------------------------------------------------------ alpha metrics

def mad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute difference x 1e3 (RVM's ``pha_mad``)."""
    pred, gt = _check_same(np.asarray(pred, np.float64), np.asarray(gt, np.float64), "MAD")
    return float(np.abs(pred - gt).mean() * 1e3)


def mse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean squared error x 1e3 (RVM's ``pha_mse``)."""
    pred, gt = _check_same(np.asarray(pred, np.float64), np.asarray(gt, np.float64), "MSE")
    return float(((pred - gt) ** 2).mean() * 1e3)


def gaussian_derivative_filters(sigma: float = GRAD_SIGMA, epsilon: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """The (fx, fy) filters of RVM's / Adobe's gradient error.

    ``fx[i, j] = G(i - h) * G'(j - h)`` (a Gaussian across, its derivative along x), normalised to unit L2 norm;
    ``fy = fx.T``. The half size ``h = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma epsilon)))`` cuts the Gaussian
    where it falls below ``epsilon`` of its peak density: h = 4 (9 x 9 filters) for sigma = 1.4.
    """
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-x ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    dg = -x * g / sigma ** 2
    fx = np.outer(g, dg)
    fx /= np.sqrt((fx ** 2).sum())
    return fx, fx.T.copy()


_FX, _FY = gaussian_derivative_filters()


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] like OpenCV's NORM_MINMAX (a constant map becomes all zeros)."""
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def gradient_magnitude(a: np.ndarray) -> np.ndarray:
    """|grad| of a map with the sigma = 1.4 Gaussian-derivative filters, borders replicated (as cv2.filter2D)."""
    gx = ndimage.correlate(a, _FX, mode="nearest")
    gy = ndimage.correlate(a, _FY, mode="nearest")
    return np.sqrt(gx ** 2 + gy ** 2)


def grad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Gradient error of one frame x 1e-3 (RVM's ``pha_grad``).

    Both maps are first min-max normalised (as RVM does), so Grad measures the shape of edges, not their level.
    """
    pred, gt = _frame_pair(pred, gt, "Grad")
    diff = gradient_magnitude(_minmax(pred)) - gradient_magnitude(_minmax(gt))
    return float((diff ** 2).sum() * 1e-3)


def _largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a binary map (empty map -> all False)."""
    labels, n = ndimage.label(binary)          # default structure: 4-connectivity in 2-D
    if n == 0:
        return np.zeros_like(binary, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def conn(pred: np.ndarray, gt: np.ndarray, step: float = CONN_STEP) -> float:
    """Connectivity error of one frame x 1e-3 (RVM's ``pha_conn``, Rhemann et al. 2009).

    For thresholds t_i = step, 2 step, ..., 1 the largest 4-connected component of ``(g >= t_i) & (p >= t_i)`` is
    the part still "connected" at level t_i. A pixel's round-down level ``l`` is the threshold just below the first
    t_i at which it leaves that component (1 if it never does). With ``d = a - l``,
    ``phi(a) = 1 - d * [d >= 0.15]``, and Conn = sum |phi(p) - phi(g)|.
    """
    pred, gt = _frame_pair(pred, gt, "Conn")
    thresholds = np.arange(0, 1 + step, step)
    round_down = -np.ones_like(gt)
    for i in range(1, len(thresholds)):
        omega = _largest_component((gt >= thresholds[i]) & (pred >= thresholds[i]))
        leaving = (round_down == -1) & ~omega
        round_down[leaving] = thresholds[i - 1]
    round_down[round_down == -1] = 1

    def phi(a: np.ndarray) -> np.ndarray:
        d = a - round_down
        return 1 - d * (d >= CONN_MIN_DIFF)

    return float(np.abs(phi(pred) - phi(gt)).sum() * 1e-3)


def dtssd_pairs(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """dtSSD x 1e2 of each consecutive frame pair (T - 1 values) of a clip (T, H, W).

    ``sqrt(mean(((p_t - p_{t-1}) - (g_t - g_{t-1}))^2))``: how much the prediction's change between two frames
    differs from the ground truth's change, i.e. flicker that the ground truth does not have.
    """
    pred, gt = _clip_pair(pred, gt, "dtSSD")
    diff = np.diff(pred, axis=0) - np.diff(gt, axis=0)
    return np.sqrt((diff ** 2).mean(axis=(1, 2))) * 1e2


def dtssd(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean dtSSD x 1e2 over the T - 1 frame pairs of a clip (RVM's script also counts a 0 for the first frame,
    so its clip value is ours times (T - 1) / T)."""
    pairs = dtssd_pairs(pred, gt)
    if pairs.size == 0:
        raise OAVMInputError("dtSSD needs at least 2 frames; the clip has 1.")
    return float(pairs.mean())


# ---------------------------------------------------------------------------------- segmentation metrics

def _binary(a: np.ndarray) -> np.ndarray:
    return np.asarray(a) > BINARY_THRESHOLD


def jaccard(pred: np.ndarray, gt_mask: np.ndarray) -> float:
    """J: IoU of ``pred > 0.5`` with ``gt_mask > 0.5``; 1.0 when both are empty (DAVIS convention)."""
    pred, gt_mask = _frame_pair(pred, gt_mask, "J")
    p, g = _binary(pred), _binary(gt_mask)
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask, as DAVIS's ``seg2bmap``.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour; in the last row only
    the east neighbour is compared, in the last column only the south one, and the bottom-right pixel is never
    a boundary pixel.
    """
    seg = np.asarray(mask, dtype=bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """A filled disk x^2 + y^2 <= r^2 (skimage.morphology.disk): DAVIS's tolerance neighbourhood."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x ** 2 + y ** 2 <= radius ** 2


@dataclass(frozen=True)
class BoundaryScore:
    precision: float
    recall: float
    f: float


def boundary_f(pred: np.ndarray, gt_mask: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> BoundaryScore:
    """DAVIS boundary precision, recall and F of ``pred > 0.5`` against ``gt_mask > 0.5``.

    The tolerance is ``ceil(tolerance * diagonal)`` pixels for ``tolerance < 1`` (DAVIS: 0.008, 8 px at 854 x 480),
    or that many pixels for ``tolerance >= 1``. Precision = predicted boundary pixels with a GT boundary pixel in
    reach / predicted boundary pixels; recall the other way round. Empty boundaries follow DAVIS: both empty ->
    P = R = 1; only one empty -> the score of that side is 1 and of the other 0.
    """
    pred, gt_mask = _frame_pair(pred, gt_mask, "F")
    radius = int(tolerance if tolerance >= 1 else math.ceil(tolerance * math.hypot(*gt_mask.shape)))
    pb, gb = boundary_map(_binary(pred)), boundary_map(_binary(gt_mask))
    n_pred, n_gt = int(pb.sum()), int(gb.sum())
    if n_pred == 0 and n_gt == 0:
        return BoundaryScore(1.0, 1.0, 1.0)
    if n_pred == 0:
        return BoundaryScore(1.0, 0.0, 0.0)
    if n_gt == 0:
        return BoundaryScore(0.0, 1.0, 0.0)
    reach = disk(radius)
    precision = float((pb & ndimage.binary_dilation(gb, reach)).sum() / n_pred)
    recall = float((gb & ndimage.binary_dilation(pb, reach)).sum() / n_gt)
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return BoundaryScore(precision, recall, f)


# ------------------------------------------------------------------------------------------- per clip

ALPHA_METRICS = ("MAD", "MSE", "Grad", "Conn", "dtSSD")
MASK_METRICS = ("J", "F", "J&F")


class AlphaClipScore:
    """MAD, MSE, Grad, Conn averaged over a clip's frames and dtSSD over its frame pairs, fed one frame at a time
    (a long clip never has to be held in memory). A one-frame clip has no dtSSD (NaN)."""

    def __init__(self) -> None:
        self.per_frame: dict[str, list[float]] = {name: [] for name in ALPHA_METRICS}
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = _frame_pair(pred, gt, "alpha metrics")
        self.per_frame["MAD"].append(mad(pred, gt))
        self.per_frame["MSE"].append(mse(pred, gt))
        self.per_frame["Grad"].append(grad(pred, gt))
        self.per_frame["Conn"].append(conn(pred, gt))
        if self._previous is not None:
            p0, g0 = self._previous
            self.per_frame["dtSSD"].append(float(dtssd_pairs(np.stack([p0, pred]), np.stack([g0, gt]))[0]))
        self._previous = (pred, gt)

    def result(self) -> dict[str, float]:
        return {name: float(np.mean(v)) if v else float("nan") for name, v in self.per_frame.items()}


class MaskClipScore:
    """J, F and J&F averaged over a clip's frames, fed one frame at a time.

    ``skip_first``: the first frame's mask is the prompt, so (as in the DAVIS semi-supervised protocol) it is
    not scored - unless the clip has only that frame.
    """

    def __init__(self, *, skip_first: bool = True) -> None:
        self.skip_first = skip_first
        self.per_frame: dict[str, list[float]] = {"J": [], "F": []}
        self._first: tuple[float, float] | None = None

    def add(self, pred: np.ndarray, gt_mask: np.ndarray) -> None:
        scores = (jaccard(pred, gt_mask), boundary_f(pred, gt_mask).f)
        if self.skip_first and self._first is None:
            self._first = scores
            return
        self.per_frame["J"].append(scores[0])
        self.per_frame["F"].append(scores[1])

    def result(self) -> dict[str, float]:
        js, fs = self.per_frame["J"], self.per_frame["F"]
        if not js and self._first is not None:
            js, fs = [self._first[0]], [self._first[1]]
        if not js:
            nan = float("nan")
            return {"J": nan, "F": nan, "J&F": nan}
        j, f = float(np.mean(js)), float(np.mean(fs))
        return {"J": j, "F": f, "J&F": (j + f) / 2}


def clip_alpha_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """:class:`AlphaClipScore` of a whole clip (T, H, W)."""
    pred, gt = _clip_pair(pred, gt, "alpha metrics")
    score = AlphaClipScore()
    for p, g in zip(pred, gt):
        score.add(p, g)
    return score.result()


def clip_mask_metrics(pred: np.ndarray, gt_mask: np.ndarray, *, skip_first: bool = True) -> dict[str, float]:
    """:class:`MaskClipScore` of a whole clip (T, H, W)."""
    pred, gt_mask = _clip_pair(pred, gt_mask, "mask metrics")
    score = MaskClipScore(skip_first=skip_first)
    for p, g in zip(pred, gt_mask):
        score.add(p, g)
    return score.result()
