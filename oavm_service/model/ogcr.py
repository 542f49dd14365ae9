# SPDX-License-Identifier: GPL-3.0-or-later
"""Object-Guided Correction and Refinement (OGCR), paper Section 3.3, Eq. 5-7 and Fig. 2b.

1. q_fb = E_fb + q_o (Eq. 5): object queries become foreground/background queries.
2. Frame-to-query cross-attention with cross-frame guidance (Eq. 6): the queries attend to F_m only inside the
   dilated, binarised previous-frame mask (M_S, Eq. 7), then residual + norm + FFN -> X_m.
3. Call-back: A = F_m . X_m^T (one map per query), concat [F_m, A] -> 1x1 conv, added to F_m (correction).
4. Pixel self-attention + FFN for edge reasoning (refinement) -> F_alpha.

The residual branches (steps 3 and 4) end in layers that ``OAVM.zero_residual_branches`` zeroes, so an
RVM-initialised network starts as RVM without recurrence and learns to use the guidance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CrossAttentionLayer, FFNLayer, MultiHeadAttention, from_tokens, sine_position_embedding, to_tokens

FFN_EXPANSION = 4


def resample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (B, 1, H, W) soft mask to ``size``: area averaging when shrinking, bilinear when enlarging."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    shrink = mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]
    if shrink:
        return F.interpolate(mask, size=size, mode="area")
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def cross_frame_guidance_mask(prev_mask: torch.Tensor, size: tuple[int, int], ks: int) -> torch.Tensor:
    """M_S of Eq. 7 as an additive attention mask, shape (B, 1, h, w) with values 0 or -inf.

    The previous frame's mask S_{k-1} (B, 1, H, W) in [0, 1] is resampled to ``size`` (F_m's size), binarised
    (B: >= 0.5 is foreground), dilated (D: ks x ks max-pool) and mapped to 0 (attend) / -inf (masked). M_S is the
    same for every query, so a sample whose dilated mask is empty (object lost or not yet visible) would give
    all -inf rows and NaN attention: such samples fall back to unmasked attention (all zeros).
    """
    if prev_mask.dim() != 4 or prev_mask.shape[1] != 1:
        raise ValueError(f"prev_mask must be (B, 1, H, W), got {tuple(prev_mask.shape)}")
    if ks < 1 or ks % 2 == 0:
        raise ValueError(f"the dilation kernel size must be a positive odd integer, got {ks}")
    binary = (resample_mask(prev_mask.float(), size) >= 0.5).float()
    dilated = F.max_pool2d(binary, ks, stride=1, padding=ks // 2) > 0
    empty = ~dilated.flatten(1).any(dim=1)
    dilated = dilated | empty.view(-1, 1, 1, 1)
    return torch.zeros(dilated.shape, device=prev_mask.device).masked_fill(~dilated, float("-inf"))


class ObjectGuidedCorrectionRefinement(nn.Module):
    """OGCR: (F_m, q_o, S_{k-1}) -> object-aware fine-grained pixel features F_alpha (same shape as F_m)."""

    def __init__(self, c: int, num_queries: int, num_heads: int, dilation_ks: int) -> None:
        super().__init__()
        self.dilation_ks = dilation_ks
        self.fb_embed = nn.Parameter(torch.empty(num_queries, c))  # E_fb (Eq. 5)
        nn.init.normal_(self.fb_embed, std=0.02)
        self.query_attn = CrossAttentionLayer(c, num_heads)       # FQAttn with M_S (Eq. 6) + residual + norm
        self.query_ffn = FFNLayer(c, FFN_EXPANSION * c)
        self.fuse = nn.Linear(c + num_queries, c)                  # 1x1 conv on [F_m; A] (call-back)
        self.pixel_norm1 = nn.LayerNorm(c)
        self.pixel_attn = MultiHeadAttention(c, num_heads)
        self.pixel_norm2 = nn.LayerNorm(c)
        self.pixel_ffn = nn.Sequential(nn.Linear(c, FFN_EXPANSION * c), nn.GELU(), nn.Linear(FFN_EXPANSION * c, c))

    def forward(self, f_m: torch.Tensor, q_o: torch.Tensor, prev_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f_m.shape
        pixels = to_tokens(f_m)                                                        # (B, HW, C)
        pos = to_tokens(sine_position_embedding(h, w, c, device=f_m.device, dtype=pixels.dtype))
        # Eq. 5-7: guided frame-to-query attention
        q_fb = self.fb_embed.to(q_o.dtype) + q_o
        m_s = cross_frame_guidance_mask(prev_mask, (h, w), self.dilation_ks).flatten(2).unsqueeze(1)
        x_m = self.query_ffn(self.query_attn(q_fb, pixels, attn_mask=m_s, pos=pos))
        # call-back: per-pixel dot products with the updated queries, concatenated with F_m (correction)
        a = torch.einsum("blc,bnc->bln", pixels, x_m) / math.sqrt(c)                  # (B, HW, N)
        pixels = pixels + self.fuse(torch.cat([pixels, a], dim=-1))
        # pixel self-attention + FFN (refinement), pre-norm so that zeroed outputs make it the identity
        y = self.pixel_norm1(pixels)
        pixels = pixels + self.pixel_attn(y + pos, y + pos, y)
        pixels = pixels + self.pixel_ffn(self.pixel_norm2(pixels))
        return from_tokens(pixels, h, w)

    def zero_residual_outputs(self) -> None:
        """Zero the last layer of each residual branch: OGCR becomes the identity F_alpha = F_m."""
        for layer in (self.fuse, self.pixel_attn.out_proj, self.pixel_ffn[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
