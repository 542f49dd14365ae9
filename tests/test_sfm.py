# SPDX-License-Identifier: GPL-3.0-or-later
"""Clip composition: Sequential Foreground Merging (paper Eq. 8-10) pixel by pixel, motion for stills, prompts."""
from __future__ import annotations

import numpy as np
import pytest

from oavm_service.train.composition import (MotionConfig, PromptNoiseConfig, SFMConfig, animate_still, composite,
                                            corrupt_prompt, sequential_foreground_merging)

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _solid(colour, shape=(1, 2, 2)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.float32), shape + (3,)).copy()


# alpha1 and alpha2 on a 2x2 frame: the four cases "only 1", "both half", "only 2", "mostly 2"
A1 = np.array([[[1.0, 0.5], [0.0, 0.25]]], np.float32)
A2 = np.array([[[0.0, 0.5], [1.0, 0.8]]], np.float32)


def _sfm(p1: float, p2: float, seed: int = 0):
    return sequential_foreground_merging(_solid(RED), A1, _solid(BLUE), _solid(GREEN), A2,
                                         rng=np.random.default_rng(seed), config=SFMConfig(p1=p1, p2=p2))


def test_merge_then_alpha1_target_matches_eq8_eq9_and_first_case_of_eq10():
    r = _sfm(p1=1.0, p2=1.0)  # always merge; always the first case of Eq. 10
    assert r.merged and not r.union_target
    # Eq. 8: B_n = a2 F2 + (1 - a2) B; Eq. 9: I = a1 F1 + (1 - a1) B_n - written out per pixel
    expected = np.array([[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]],
                         [[0.0, 1.0, 0.0], [0.25, 0.75 * 0.8, 0.75 * 0.2]]], np.float32)
    np.testing.assert_allclose(r.image[0], expected, atol=1e-6)
    np.testing.assert_array_equal(r.alpha, A1)
    np.testing.assert_array_equal(r.foreground, _solid(RED))
    # M_i = alpha_i > 0.5 (0.5 itself is not foreground)
    np.testing.assert_array_equal(r.instances[0][0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(r.instances[1][0], [[0, 0], [1, 1]])


def test_merge_then_union_target_is_second_case_of_eq10():
    r = _sfm(p1=1.0, p2=0.0)  # always merge; always the union
    assert r.merged and r.union_target
    np.testing.assert_allclose(r.alpha[0], [[1.0, 0.75], [1.0, 1.0 - 0.75 * 0.2]], atol=1e-6)
    # the target layer (alpha_GT, F_u) over the plain background reproduces the composed image exactly
    np.testing.assert_allclose(composite(r.foreground, r.alpha, _solid(BLUE)), r.image, atol=1e-6)
    assert len(r.instances) == 2


def test_no_merge_is_plain_composite_with_alpha1():
    r = _sfm(p1=0.0, p2=0.0)
    assert not r.merged and not r.union_target
    np.testing.assert_allclose(r.image, composite(_solid(RED), A1, _solid(BLUE)), atol=1e-6)
    np.testing.assert_array_equal(r.alpha, A1)
    assert len(r.instances) == 1


def test_branch_frequencies_follow_p1_and_p2_with_a_seeded_generator():
    rng = np.random.default_rng(1234)
    merged = union = 0
    n = 4000
    for _ in range(n):
        r = sequential_foreground_merging(_solid(RED, (1, 1, 1)), A1[:, :1, :1], _solid(BLUE, (1, 1, 1)),
                                          _solid(GREEN, (1, 1, 1)), A2[:, :1, :1], rng=rng)
        merged += r.merged
        union += r.union_target
    assert abs(merged / n - 0.4) < 0.03           # p1 = 0.4 (paper Section 4.1)
    assert abs(union / merged - 0.5) < 0.04       # p2 = 0.5 among merged clips
    # the same seed gives the same branches (what exact resume relies on)
    a = _sfm(0.4, 0.5, seed=7)
    b = _sfm(0.4, 0.5, seed=7)
    assert (a.merged, a.union_target) == (b.merged, b.union_target)
    np.testing.assert_array_equal(a.image, b.image)


def test_sfm_rejects_mismatched_sizes_with_a_hint():
    with pytest.raises(ValueError, match="Resize/crop"):
        sequential_foreground_merging(_solid(RED), A1, _solid(BLUE, (1, 3, 3)), rng=np.random.default_rng(0))


def test_animate_still_moves_layers_together_and_starts_at_the_still():
    rng = np.random.default_rng(3)
    h, w = 40, 60
    alpha = np.zeros((h, w), np.float32)
    alpha[10:30, 20:40] = 1.0
    fg = np.zeros((h, w, 3), np.float32)
    fg[alpha > 0] = GREEN
    config = MotionConfig(max_shift=0.2, max_zoom=0.1, max_rotate_deg=0.0, blur_probability=0.0)
    fgs, alphas = animate_still([fg, alpha], 5, rng=rng, config=config)
    assert fgs.shape == (5, h, w, 3) and alphas.shape == (5, h, w)
    np.testing.assert_allclose(alphas[0], alpha, atol=1e-6)         # t = 0 is the identity
    assert np.abs(alphas[-1] - alpha).sum() > 10                      # ...and it really moves
    np.testing.assert_allclose(fgs[..., 1], alphas, atol=1e-5)       # colour and alpha stay aligned


def test_motion_blur_smears_along_the_motion():
    rng = np.random.default_rng(0)
    img = np.zeros((32, 32), np.float32)
    img[:, 16] = 1.0
    config = MotionConfig(max_shift=0.5, max_zoom=0.0, max_rotate_deg=0.0, blur_probability=1.0, max_blur_px=7)
    (frames,) = animate_still([img], 3, rng=rng, config=config)
    assert frames[1].max() < 1.0 and frames[1].sum() == pytest.approx(img.sum(), rel=0.05)


def test_corrupt_prompt_is_wrong_but_close_and_never_empty():
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 20:44] = 1.0
    rng = np.random.default_rng(0)
    ious = []
    for _ in range(50):
        p = corrupt_prompt(mask, rng=rng)
        assert set(np.unique(p)) <= {0.0, 1.0} and p.any()
        ious.append(((p > 0) & (mask > 0)).sum() / ((p > 0) | (mask > 0)).sum())
    assert 0.5 < np.mean(ious) < 0.99      # corrupted on average, still the same object
    tiny = np.zeros((64, 64), np.float32)
    tiny[30, 30] = 1.0
    always_erode = PromptNoiseConfig(morph_probability=1.0, hole_probability=0, blob_probability=0,
                                     shift_probability=0)
    for seed in range(10):  # erosion would delete a 1-pixel object: the clean mask is kept instead
        assert corrupt_prompt(tiny, rng=np.random.default_rng(seed), config=always_erode).any()
