# SPDX-License-Identifier: GPL-3.0-or-later
"""Hungarian matching (scipy) against brute force over all assignments, and the pairwise cost terms."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oavm_service.train.matcher import MatchCost, hungarian_match, match_cost, pairwise_dice, pairwise_mask_bce


def _random_case(gen: torch.Generator, queries: int, targets: int, classes: int = 2, size: int = 6):
    class_logits = torch.randn(queries, classes + 1, generator=gen)
    mask_logits = torch.randn(queries, size, size, generator=gen) * 3
    labels = torch.randint(0, classes, (targets,), generator=gen)
    masks = (torch.rand(targets, size, size, generator=gen) > 0.5).float()
    return class_logits, mask_logits, labels, masks


def _brute_force_min(table: np.ndarray) -> float:
    queries, targets = table.shape
    return min(sum(table[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), targets))


@pytest.mark.parametrize("queries,targets", [(1, 1), (3, 1), (3, 3), (4, 2), (5, 3), (5, 5)])
def test_hungarian_equals_brute_force(queries, targets):
    gen = torch.Generator().manual_seed(queries * 10 + targets)
    for _ in range(20):
        case = _random_case(gen, queries, targets)
        rows, cols = hungarian_match(*case)
        table = match_cost(*case).numpy()
        assert len(set(rows)) == len(rows) == targets and sorted(cols) == list(range(targets))
        assert table[rows, cols].sum() == pytest.approx(_brute_force_min(table), abs=1e-5)


def test_pairwise_terms_equal_per_pair_losses():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    targets = (torch.rand(3, 50, generator=gen) > 0.3).float()
    bce = pairwise_mask_bce(logits, targets)
    dice = pairwise_dice(logits, targets)
    for q in range(4):
        for k in range(3):
            assert bce[q, k] == pytest.approx(F.binary_cross_entropy_with_logits(logits[q], targets[k]).item(), rel=1e-5)
            p = logits[q].sigmoid()
            expected = 1 - (2 * (p * targets[k]).sum() + 1) / (p.sum() + targets[k].sum() + 1)
            assert dice[q, k] == pytest.approx(expected.item(), rel=1e-5)


def test_cost_weights_change_the_matching():
    # query 0 has the right class but the wrong mask, query 1 the right mask but the wrong class
    masks = torch.zeros(1, 4, 4)
    masks[0, :2] = 1
    mask_logits = torch.stack([-masks[0] * 8 + 4, masks[0] * 8 - 4])
    class_logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    labels = torch.tensor([0])
    assert hungarian_match(class_logits, mask_logits, labels, masks, MatchCost(10, 0.1, 0.1))[0].tolist() == [0]
    assert hungarian_match(class_logits, mask_logits, labels, masks, MatchCost(0.1, 5, 5))[0].tolist() == [1]


def test_no_targets_and_too_many_targets():
    gen = torch.Generator().manual_seed(1)
    case = _random_case(gen, 3, 0)
    rows, cols = hungarian_match(*case)
    assert rows.size == cols.size == 0
    with pytest.raises(ValueError, match="num_queries"):
        hungarian_match(*_random_case(gen, 2, 3))
