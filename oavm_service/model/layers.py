# SPDX-License-Identifier: GPL-3.0-or-later
"""Building blocks shared by OQG and OGCR: 2D sine position embedding, multi-head attention on
``F.scaled_dot_product_attention`` (fused kernels on GPU) and Mask2Former's post-norm decoder layers.

Token tensors are ``(B, L, C)``; feature maps are ``(B, C, H, W)`` and are flattened with :func:`to_tokens`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); works for channels-last and contiguous inputs alike."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.transpose(1, 2).unflatten(2, (h, w))


def sine_position_embedding(h: int, w: int, dim: int, *, device: torch.device | None = None,
                            dtype: torch.dtype = torch.float32, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed, normalised 2D sinusoidal position embedding (DETR / Mask2Former), shape (1, dim, h, w).

    Normalised to the map size, so the same relative position gets the same code at every resolution
    ("a fixed 2D sinusoidal positional embedding for each resolution", Section 3.3).
    """
    per_axis = 2 * math.ceil(dim / 4)  # even number of features per axis; truncated to ``dim`` at the end
    scale, eps = 2 * math.pi, 1e-6
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / (h + eps) * scale
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / (w + eps) * scale
    i = torch.arange(per_axis, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / per_axis)

    def encode(v: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, per_axis), interleaved sin/cos
        p = v[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, per_axis)
    pos_x = encode(x)[None, :, :].expand(h, w, per_axis)
    pos = torch.cat((pos_y, pos_x), dim=2)[..., :dim]
    return pos.permute(2, 0, 1).unsqueeze(0).to(dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections, computed by ``F.scaled_dot_product_attention``.

    ``attn_mask``: boolean (True = may attend) or additive float (0 / -inf), broadcastable to (B, heads, Lq, Lk).
    Callers guarantee that no row is fully masked (both masked attentions in OAVM fall back to unmasked rows).
    ``fold_projections`` (set by :func:`oavm_service.model.fuse.optimize_for_inference`): few queries over many
    keys are computed by :meth:`_folded`, which never projects the keys and values.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.fold_projections = False

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        lq, lk, dim = q.shape[1], k.shape[1], q.shape[2]
        if self.fold_projections and (self.heads - 1) * lq * lk < dim * (lk - lq):
            return self._folded(q, k, v, attn_mask)
        qh, kh, vh = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(qh.dtype)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _folded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The same attention with the key and value projections moved to the queries' side (inference).

        Per head h: q_h . (W_kh k + b_kh) = (W_kh^T q_h) . k + q_h . b_kh, and the last term is the same for every
        key of a row, which softmax ignores; softmax(.) (W_vh v + b_vh) = W_vh (softmax(.) v) + b_vh, since a
        softmax row sums to 1. So no key or value is projected: the cost goes from 2 Lk C^2 + 2 Lq Lk C to
        2 Lq C^2 + 2 H Lq Lk C multiply-adds, less whenever (H - 1) Lq Lk < C (Lk - Lq) (the condition in
        :meth:`forward`). OQG's 16 queries over a stride-4 map of 9,216 tokens at 512x288: about 2.2x fewer.
        """
        b, lq, dim = q.shape
        heads, d = self.heads, dim // self.heads
        qh = self._split(self.q_proj(q))                                              # (B, H, Lq, d)
        q_keys = torch.matmul(qh, self.k_proj.weight.view(heads, d, dim))             # (B, H, Lq, C)
        logits = torch.matmul(q_keys.flatten(1, 2), k.transpose(1, 2)).unflatten(1, (heads, lq))
        logits = logits * d ** -0.5                                                   # (B, H, Lq, Lk)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else \
                logits + attn_mask.to(logits.dtype)
        context = torch.matmul(logits.softmax(dim=-1).flatten(1, 2), v).unflatten(1, (heads, lq))  # (B,H,Lq,C)
        out = torch.matmul(context, self.v_proj.weight.view(heads, d, dim).transpose(1, 2)) + \
            self.v_proj.bias.view(heads, 1, d)                                        # (B, H, Lq, d)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def _with_pos(t: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return t if pos is None else t + pos


class CrossAttentionLayer(nn.Module):
    """Mask2Former's (masked) cross-attention layer, post-norm: ``tgt = norm(tgt + attn(tgt+qpos, mem+pos, mem))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, attn_mask)
        return self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    """Mask2Former's self-attention layer, post-norm."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        qk = _with_pos(tgt, query_pos)
        return self.norm(tgt + self.attn(qk, qk, tgt))


class FFNLayer(nn.Module):
    """Mask2Former's feed-forward layer, post-norm: ``norm(x + W2 relu(W1 x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Plain MLP (Mask2Former's mask-embedding head): Linear-ReLU-...-Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)`` that keeps a channels-last layout.

    On the CPU torch.cat of channels-last maps returns the default layout; the next convolution then reorders its
    input, and at full resolution the decoder's cat + convolution took 2-3x as long (512x288, 2-core EPYC).
    Concatenating the NHWC views along their last axis gives the same values in channels-last layout (and stays
    differentiable). The first map decides: channels-last here means its channels vary fastest (stride 1), which
    also holds for the crops and channel slices of channels-last maps that the decoder concatenates; the others
    (e.g. a 3-channel source image in either layout) are copied into the result whatever their layout."""
    if tensors[0].dim() == 4 and tensors[0].stride(1) == 1 and tensors[0].shape[1] > 1:
        return torch.cat([t.permute(0, 2, 3, 1) for t in tensors], dim=3).permute(0, 3, 1, 2)
    return torch.cat(tensors, dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (batch-size independent; the pixel decoder sees batches of 1 at inference)."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)
