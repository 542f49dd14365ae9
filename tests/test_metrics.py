# SPDX-License-Identifier: GPL-3.0-or-later
"""Metrics against numbers worked out by hand (the reasoning is in each test), never by calling the metric."""
from __future__ import annotations

import numpy as np
import pytest

from oavm_service.errors import OAVMInputError
from oavm_service.train import metrics as M


def test_mad_mse_scales():
    pred = np.array([[0.0, 1.0], [0.5, 0.5]])
    gt = np.array([[0.0, 0.0], [1.0, 0.5]])
    # |d| = 0, 1, 0.5, 0 -> mean 0.375 -> x1e3 = 375;  d^2 = 0, 1, 0.25, 0 -> mean 0.3125 -> 312.5
    assert M.mad(pred, gt) == pytest.approx(375.0)
    assert M.mse(pred, gt) == pytest.approx(312.5)


def test_grad_filter_size_and_norm():
    fx, fy = M.gaussian_derivative_filters(1.4)
    # h = ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(1.4 * sqrt(6.6995)) = ceil(3.62) = 4 -> 9 x 9
    assert fx.shape == (9, 9)
    assert np.allclose(fy, fx.T)
    assert (fx ** 2).sum() == pytest.approx(1.0)
    # derivative along x: antisymmetric across the centre column, zero in it
    assert np.allclose(fx[:, 4], 0) and np.allclose(fx[:, :4], -fx[:, :4:-1])


def test_grad_of_an_impulse_is_the_filter_energy():
    # An impulse far from the borders: its response to fx (fy) is the filter itself, so the sum over pixels of
    # |grad|^2 = sum fx^2 + sum fy^2 = 1 + 1 = 2. GT all zero -> normalised to zeros -> |grad| = 0.
    # Grad = 2 x 1e-3 = 0.002.
    gt = np.zeros((21, 21))
    pred = gt.copy()
    pred[10, 10] = 1.0
    assert M.grad(pred, gt) == pytest.approx(0.002, rel=1e-9)
    # min-max normalisation: an impulse of height 0.3 scores the same
    pred[10, 10] = 0.3
    assert M.grad(pred, gt) == pytest.approx(0.002, rel=1e-9)
    # two impulses whose 9 x 9 footprints do not overlap: 4 x 1e-3
    pred = np.zeros((21, 31))
    pred[10, 6] = pred[10, 24] = 1.0
    assert M.grad(pred, np.zeros_like(pred)) == pytest.approx(0.004, rel=1e-9)
    assert M.grad(pred, pred) == 0.0


def test_conn_disconnected_pixel():
    # gt = [[1, 1], [0, 0]], pred = [[1, 0], [0, 0]]. For every threshold the intersection is pixel (0,0) only,
    # so every other pixel leaves at t=0.1 (round-down 0) and (0,0) never leaves (round-down 1).
    # gt diff = [[0, 1], [0, 0]] -> phi_g = [[1, 0], [1, 1]]; pred diff = 0 -> phi_p = 1. Sum |.| = 1 -> 0.001.
    gt = np.array([[1.0, 1.0], [0.0, 0.0]])
    pred = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert M.conn(pred, gt) == pytest.approx(0.001)
    assert M.conn(gt, gt) == 0.0


def test_conn_fractional_round_down():
    # gt = [[1, 0.5]], pred = [[1, 0.25]]. Thresholds 0.1, 0.2: both pixels in one component. At 0.3 pixel 1
    # (pred 0.25) leaves -> round-down 0.2. gt diff = 0.5 - 0.2 = 0.3 >= 0.15 -> phi_g = 0.7; pred diff 0.05
    # < 0.15 -> phi_p = 1. Conn = 0.3 x 1e-3.
    assert M.conn(np.array([[1.0, 0.25]]), np.array([[1.0, 0.5]])) == pytest.approx(3e-4)


def test_conn_keeps_only_the_largest_component():
    # gt = [[1, 1, 1]], pred = [[1, 0, 1]]: two 1-pixel components, the first (pixel 0) counts as largest.
    # round-down = [1, 0, 0]; gt diff [0, 1, 1] -> phi_g [1, 0, 0]; pred diff [0, 0, 1] -> phi_p [1, 1, 0].
    # Sum |.| = 1 -> 0.001 (pixel 2 is right but disconnected: it costs nothing, pixel 1 is the error).
    assert M.conn(np.array([[1.0, 0.0, 1.0]]), np.array([[1.0, 1.0, 1.0]])) == pytest.approx(0.001)


def test_dtssd():
    # uniform 2x2 frames. pred 0, 0.1, 0.1; gt 0, 0, 0.2 -> pair 1: 0.1 - 0 -> 10; pair 2: 0 - 0.2 -> 20.
    pred = np.stack([np.full((2, 2), v) for v in (0.0, 0.1, 0.1)])
    gt = np.stack([np.full((2, 2), v) for v in (0.0, 0.0, 0.2)])
    assert np.allclose(M.dtssd_pairs(pred, gt), [10.0, 20.0])
    assert M.dtssd(pred, gt) == pytest.approx(15.0)
    # non-uniform change: differences 0.3, 0, 0, 0.4 -> mean square (0.09 + 0.16) / 4 = 0.0625 -> sqrt 0.25 -> 25
    pred = np.stack([np.zeros((2, 2)), np.array([[0.3, 0.0], [0.0, 0.4]])])
    assert M.dtssd(pred, np.zeros_like(pred)) == pytest.approx(25.0)
    # a static error (same offset every frame) is not flicker
    gt = np.zeros((3, 2, 2))
    assert M.dtssd(gt + 0.5, gt) == 0.0


def test_jaccard():
    pred = np.array([[0.9, 0.6], [0.4, 0.0]])       # > 0.5: top row
    gt = np.array([[1.0, 0.0], [1.0, 0.0]])         # left column
    assert M.jaccard(pred, gt) == pytest.approx(1 / 3)   # intersection 1, union 3
    assert M.jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_boundary_f():
    # gt: columns >= 5 of a 10x10 image. seg2bmap marks the pixel left of the edge: column 4, 10 pixels
    # (the last column is inside on both sides of every comparison; the bottom-right pixel is never marked).
    gt = np.zeros((10, 10))
    gt[:, 5:] = 1
    assert np.array_equal(np.argwhere(M.boundary_map(gt > 0.5))[:, 1], np.full(10, 4))
    assert M.boundary_f(gt, gt).f == 1.0
    # prediction 3 columns to the right: boundary at column 7, 3 px away: out of reach at 2 px, in reach at 3 px
    pred = np.zeros((10, 10))
    pred[:, 8:] = 1
    assert M.boundary_f(pred, gt, tolerance=2).f == 0.0
    assert M.boundary_f(pred, gt, tolerance=3).f == 1.0
    # an extra 1-pixel blob at (0, 0): one more predicted boundary pixel, 4 px from column 4.
    # default tolerance on 10x10: ceil(0.008 * 14.14) = 1 px -> P = 10/11, R = 1, F = 2PR/(P+R) = 20/21
    pred = gt.copy()
    pred[0, 0] = 1
    score = M.boundary_f(pred, gt)
    assert (score.precision, score.recall) == (pytest.approx(10 / 11), 1.0)
    assert score.f == pytest.approx(20 / 21)
    # nothing predicted: P = 1, R = 0 (DAVIS), F = 0
    assert M.boundary_f(np.zeros((10, 10)), gt) == M.BoundaryScore(1.0, 0.0, 0.0)


def test_clip_wrappers():
    gt = np.zeros((3, 10, 10))
    gt[:, :, 5:] = 1
    pred = gt.copy()
    pred[0] = 0                                       # the prompt frame is wrong, but it is not scored
    assert M.clip_mask_metrics(pred, gt) == {"J": 1.0, "F": 1.0, "J&F": 1.0}
    assert M.clip_mask_metrics(pred, gt, skip_first=False)["J"] == pytest.approx(2 / 3)   # (0 + 1 + 1) / 3
    # alpha: one frame off by 0.5 on its 50 object pixels -> MAD of that frame 0.25 x 1e3, mean over 3 = 250/3
    pred = gt.copy()
    pred[1, :, 5:] = 0.5
    out = M.clip_alpha_metrics(pred, gt)
    assert set(out) == set(M.ALPHA_METRICS)
    assert out["MAD"] == pytest.approx(250 / 3)
    # dtSSD: pairs (0->1) and (1->2) each change 50 of 100 pixels by 0.5: sqrt(0.25 * 0.5) x 1e2 each
    assert out["dtSSD"] == pytest.approx(np.sqrt(0.125) * 100)


@pytest.mark.parametrize("call", [
    lambda: M.mad(np.zeros((2, 2)), np.zeros((3, 2))),
    lambda: M.grad(np.zeros((2, 2, 1)), np.zeros((2, 2, 1))),
    lambda: M.conn(np.full((2, 2), 255.0), np.zeros((2, 2))),
    lambda: M.jaccard(np.full((2, 2), np.nan), np.zeros((2, 2))),
    lambda: M.dtssd(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))),
])
def test_bad_input_says_what_to_do(call):
    with pytest.raises(OAVMInputError):
        call()
