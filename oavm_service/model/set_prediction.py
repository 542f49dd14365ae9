# SPDX-License-Identifier: GPL-3.0-or-later
"""The set-prediction head of the prediction stage (Section 3.4), used only in training.

Mask classification as in MaskFormer [3]: each query state of every OQG decoder layer (including the learnable
queries before the first layer, for the auxiliary losses) gets class logits (num_classes + 1, the last being
"no object"); its mask logits come from OQG, which needs them for masked attention anyway. The losses (Hungarian
matching etc.) live in ``oavm_service.train``; inference never builds this module.
"""
from __future__ import annotations

import torch
from torch import nn

from .oqg import OQGOutput


class SetPredictionHead(nn.Module):
    """Class head Linear(C, num_classes + 1) applied to every layer's query states."""

    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.class_embed = nn.Linear(c, num_classes + 1)

    def forward(self, queries: OQGOutput) -> list[dict[str, torch.Tensor]]:
        """One dict per decoder layer (index 0 = before the first layer, last = final prediction):
        ``pred_logits`` (B, N, num_classes + 1) and ``pred_masks`` (B, N, H/4, W/4) mask logits."""
        return [{"pred_logits": self.class_embed(state), "pred_masks": masks}
                for state, masks in zip(queries.states, queries.mask_logits)]
