# SPDX-License-Identifier: GPL-3.0-or-later
"""Hungarian matching of object queries to ground-truth instances (DETR / Mask2Former set prediction).

The OQG branch (Section 3.2) predicts N (class, mask) pairs per frame; the instance targets M_i (Section 3.5) are
an unordered set. As in Mask2Former (Cheng et al., CVPR 2022), each target is assigned to exactly one query by
minimising a cost that mixes classification and mask quality; unmatched queries are "no object".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["MatchCost", "pairwise_mask_bce", "pairwise_dice", "match_cost", "hungarian_match"]


@dataclass(frozen=True)
class MatchCost:
    """Weights of the matching cost; Mask2Former's defaults (class 2, mask BCE 5, dice 5)."""

    weight_class: float = 2.0
    weight_mask: float = 5.0
    weight_dice: float = 5.0


def pairwise_mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel sigmoid BCE between every prediction ``(Q, P)`` and every target ``(K, P)`` -> ``(Q, K)``.

    Uses ``BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x)``, so the pairwise table is two matrix products.
    """
    pos = F.softplus(-logits)
    neg = F.softplus(logits)
    pixels = logits.shape[-1]
    return (pos @ targets.T + neg @ (1.0 - targets).T) / pixels


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` for every prediction/target pair -> ``(Q, K)``."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def match_cost(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor, cost: MatchCost = MatchCost()) -> torch.Tensor:
    """The ``(Q, K)`` cost table: ``-w_c p(label) + w_m BCE + w_d dice`` (Mask2Former's matcher).

    ``class_logits`` ``(Q, C + 1)`` (last class = no object), ``mask_logits`` ``(Q, H, W)``, ``labels`` ``(K,)``,
    ``masks`` ``(K, H, W)`` in {0, 1} at the prediction's resolution.
    """
    probs = class_logits.float().softmax(-1)
    cost_class = -probs[:, labels]
    pred = mask_logits.float().flatten(1)
    target = masks.float().flatten(1)
    return (cost.weight_class * cost_class + cost.weight_mask * pairwise_mask_bce(pred, target)
            + cost.weight_dice * pairwise_dice(pred, target))


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor, cost: MatchCost = MatchCost()) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(query_indices, target_indices)`` of the minimum-cost one-to-one assignment.

    Needs at least as many queries as targets (every target gets a query). With no targets both arrays are empty.
    """
    queries, targets = mask_logits.shape[0], masks.shape[0]
    if targets == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if targets > queries:
        raise ValueError(f"{targets} instance targets but only {queries} object queries: raise the model's "
                         "num_queries or cap the instances per clip (data config max_instances).")
    table = match_cost(class_logits, mask_logits, labels, masks, cost).cpu().numpy()
    rows, cols = linear_sum_assignment(table)
    return rows.astype(np.int64), cols.astype(np.int64)
