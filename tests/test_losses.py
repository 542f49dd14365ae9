# SPDX-License-Identifier: GPL-3.0-or-later
"""Training losses: RVM matting terms, mask BCE + dice, Mask2Former set loss (matching, no-object weight)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oavm_service.train.losses import (LossConfig, SetTarget, dice_loss, laplacian_loss, matting_loss,
                                       segmentation_loss, set_prediction_loss, temporal_coherence, total_loss)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_laplacian_loss_ignores_a_constant_offset_but_not_detail():
    true = _rand(2, 1, 64, 64)
    assert laplacian_loss(true, true).item() == 0.0
    # a constant offset has no band-pass content: every pyramid level is identical (L1 would see 0.1)
    assert laplacian_loss(true + 0.1, true).item() == pytest.approx(0.0, abs=1e-6)
    # a one-pixel checkerboard lives in the finest level (weight 2^0 = 1, then / 5 levels)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 0.2
    loss = laplacian_loss(true + checker, true).item()
    assert 0.01 < loss < 0.2


def test_laplacian_loss_refuses_tiny_frames_with_a_hint():
    with pytest.raises(ValueError, match="laplacian_levels"):
        laplacian_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), levels=5)


def test_temporal_coherence_compares_frame_to_frame_change():
    true = _rand(1, 3, 1, 8, 8)
    assert temporal_coherence(true + 0.3, true).item() == pytest.approx(0.0, abs=1e-7)  # same changes
    flicker = true.clone()
    flicker[:, 1] += 0.5
    # differences: +0.5 then -0.5 relative to the truth -> MSE 0.25
    assert temporal_coherence(flicker, true).item() == pytest.approx(0.25, rel=1e-5)
    assert temporal_coherence(true[:, :1], true[:, :1]).item() == 0.0


def test_matting_loss_terms_and_foreground_only_inside_the_object():
    alpha = torch.zeros(1, 2, 1, 64, 64)
    alpha[..., 16:48, 16:48] = 1.0
    fgr = _rand(1, 2, 3, 64, 64)
    wrong_outside = fgr.clone()
    wrong_outside[..., :8, :] = 0.0                # rows 0-7 lie outside the object
    loss = matting_loss(alpha, alpha, pred_fgr=wrong_outside, true_fgr=fgr)
    assert set(loss) == {"alpha_l1", "alpha_laplacian", "alpha_coherence", "fgr_l1", "fgr_coherence"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-7) for v in loss.values())
    half = matting_loss(alpha * 0.5, alpha)
    assert half["alpha_l1"].item() == pytest.approx(0.5 * alpha.mean().item(), rel=1e-5)
    assert "fgr_l1" not in half


def test_segmentation_loss_bce_and_dice():
    target = torch.zeros(1, 1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    perfect = segmentation_loss((target * 2 - 1) * 20, target)
    assert perfect["mask_bce"].item() < 1e-6 and perfect["mask_dice"].item() < 1e-3
    unsure = segmentation_loss(torch.zeros_like(target), target)
    assert unsure["mask_bce"].item() == pytest.approx(F.binary_cross_entropy(torch.full_like(target, 0.5), target).item())
    assert dice_loss(torch.full((1, 4), -20.0), torch.zeros(1, 4)).item() == pytest.approx(0.0, abs=1e-6)


def _perfect_layer(masks: torch.Tensor, queries: int, order: list[int]):
    """Class/mask logits where query order[k] predicts target k exactly and the rest say 'no object'."""
    k, h, w = masks.shape
    class_logits = torch.full((1, queries, 2), -10.0)
    class_logits[0, :, 1] = 10.0                              # no object
    mask_logits = torch.full((1, queries, h, w), -10.0)
    for target, query in enumerate(order):
        class_logits[0, query] = torch.tensor([10.0, -10.0])
        mask_logits[0, query] = masks[target] * 20 - 10
    return class_logits, mask_logits


def test_set_loss_is_zero_for_a_perfect_prediction_in_any_query_order():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1
    masks[1, 5:, 5:] = 1
    target = [SetTarget(torch.tensor([0, 0]), masks)]
    for order in ([0, 1], [3, 2], [1, 4]):
        loss = set_prediction_loss([_perfect_layer(masks, 5, order)], target)
        assert loss["set_class"].item() < 1e-3
        assert loss["set_mask"].item() < 1e-3
        assert loss["set_dice"].item() < 0.05


def test_set_loss_class_term_uses_no_object_weight_and_sums_over_layers():
    gen = torch.Generator().manual_seed(0)
    class_logits = torch.randn(1, 4, 2, generator=gen)
    mask_logits = torch.randn(1, 4, 8, 8, generator=gen)
    empty = [SetTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8, 8))]
    loss = set_prediction_loss([(class_logits, mask_logits)], empty)
    # no targets: every query's target is "no object" -> the weighted mean equals the plain mean
    assert loss["set_class"].item() == pytest.approx(F.cross_entropy(class_logits[0], torch.ones(4, dtype=torch.long)).item(), rel=1e-5)
    assert loss["set_mask"].item() == 0.0
    # one target matched to some query: weights 1 (object) and 0.1 (no object) in the weighted mean
    masks = (torch.rand(1, 8, 8, generator=gen) > 0.5).float()
    one = [SetTarget(torch.tensor([0]), masks)]
    loss = set_prediction_loss([(class_logits, mask_logits)], one)
    per_query = F.cross_entropy(class_logits[0], torch.ones(4, dtype=torch.long), reduction="none")
    obj = F.cross_entropy(class_logits[0], torch.zeros(4, dtype=torch.long), reduction="none")
    candidates = [((obj[q] + 0.1 * (per_query.sum() - per_query[q])) / (1 + 0.1 * 3)).item() for q in range(4)]
    assert any(loss["set_class"].item() == pytest.approx(c, rel=1e-5) for c in candidates)
    two_layers = set_prediction_loss([(class_logits, mask_logits)] * 2, one)
    assert two_layers["set_class"].item() == pytest.approx(2 * loss["set_class"].item(), rel=1e-6)


def test_set_loss_resamples_targets_to_the_prediction_size_and_backpropagates():
    masks = torch.zeros(1, 32, 32)
    masks[0, :16] = 1
    class_logits = torch.zeros(2, 3, 2, requires_grad=True)
    mask_logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    targets = [SetTarget(torch.tensor([0]), masks), SetTarget(torch.zeros(0, dtype=torch.long), masks[:0])]
    parts = set_prediction_loss([(class_logits, mask_logits)], targets)
    weighted = total_loss(parts, LossConfig(set_scale=0.5))
    weighted.total.backward()
    assert mask_logits.grad.abs().sum() > 0 and class_logits.grad.abs().sum() > 0
    expected = 0.5 * (2 * parts["set_class"] + 5 * parts["set_mask"] + 5 * parts["set_dice"])
    assert weighted.total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 frames"):
        set_prediction_loss([(class_logits, mask_logits)], targets[:1] * 3)
