# SPDX-License-Identifier: GPL-3.0-or-later
"""Object-level Query Generation (OQG), paper Section 3.2 (Mask2Former-style set prediction).

A light pixel decoder alternates convolution and upsampling over x4, F_s3 and F_s2 to give the multi-scale
features {F_P0, F_P1, F_P2} (strides 16, 8, 4) and per-pixel mask features (stride 4); its 3x3 convolutions are
depthwise-separable (``OAVMConfig.pixel_decoder``), which is what keeps the stride-4 level light. A transformer
decoder of L layers updates N learnable object queries; layer l cross-attends to scale l mod 3 with masked
attention (the mask is the previous layer's predicted query masks), then self-attends, then applies an FFN. A final
self-attention + MLP turns the queries into q_o, which OGCR consumes. OQG runs once per frame, shared by all
objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, group_norm, sine_position_embedding,
                     to_tokens)

NUM_SCALES = 3
FFN_EXPANSION = 4


@dataclass
class OQGOutput:
    """q_o plus what the training head needs: per-layer query states and mask logits, index 0 = before layer 1
    (both lists empty when OQG ran without ``layer_outputs``, as at inference)."""

    q_o: torch.Tensor                 # (B, N, C) object-level queries for OGCR
    states: list[torch.Tensor]        # L + 1 tensors (B, N, C): decoder-normed query states
    mask_logits: list[torch.Tensor]   # L + 1 tensors (B, N, H/4, W/4) on the (padded) network-resolution frame


def _conv3x3_gn_relu(c: int, separable: bool) -> nn.Sequential:
    """3x3 convolution + GroupNorm + ReLU; ``separable``: depthwise 3x3 then pointwise 1x1 (C*9 + C*C weights per
    pixel instead of C*C*9: at C = 128 and stride 4 that is 0.16 instead of 1.36 GMACs for a 512x288 frame)."""
    conv = [nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False)] if separable else \
        [nn.Conv2d(c, c, 3, 1, 1, bias=False)]
    return nn.Sequential(*conv, group_norm(c), nn.ReLU(inplace=True))


class PixelDecoder(nn.Module):
    """Iterative upsampling: F_P0 = conv(x4); F_P{i+1} = conv(up(F_Pi) + lateral(skip)); mask features at /4."""

    def __init__(self, c: int, skip_channels: tuple[int, int], separable: bool = True) -> None:
        super().__init__()
        self.conv0 = _conv3x3_gn_relu(c, separable)
        self.lateral1 = nn.Sequential(nn.Conv2d(skip_channels[0], c, 1, bias=False), group_norm(c))
        self.conv1 = _conv3x3_gn_relu(c, separable)
        self.lateral2 = nn.Sequential(nn.Conv2d(skip_channels[1], c, 1, bias=False), group_norm(c))
        self.conv2 = _conv3x3_gn_relu(c, separable)
        self.mask_features = nn.Conv2d(c, c, 1)

    @staticmethod
    def _up_add(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip

    def scales(self, x4: torch.Tensor, f_s3: torch.Tensor, f_s2: torch.Tensor) -> list[torch.Tensor]:
        """{F_P0, F_P1, F_P2} at strides 16, 8, 4."""
        p0 = self.conv0(x4)
        p1 = self.conv1(self._up_add(p0, self.lateral1(f_s3)))
        return [p0, p1, self.conv2(self._up_add(p1, self.lateral2(f_s2)))]

    def forward(self, x4: torch.Tensor, f_s3: torch.Tensor, f_s2: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The scales and the per-pixel mask features (a 1x1 projection of F_P2)."""
        scales = self.scales(x4, f_s3, f_s2)
        return scales, self.mask_features(scales[-1])


def query_attention_mask(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masked-attention mask of Mask2Former: a query may attend where its resized mask has sigmoid >= 0.5.

    Returns a boolean (B, 1, N, h*w) tensor (True = may attend). A query whose mask is empty everywhere falls back
    to unmasked attention, so the softmax never sees an all -inf row.
    """
    m = F.interpolate(mask_logits.detach().float(), size=size, mode="bilinear", align_corners=False)
    allowed = m.flatten(2) >= 0.0  # sigmoid(x) >= 0.5  <=>  x >= 0
    empty = ~allowed.any(dim=-1, keepdim=True)
    return (allowed | empty).unsqueeze(1)


class ObjectQueryGeneration(nn.Module):
    """OQG: pixel decoder + L-layer masked-attention transformer decoder + final self-attention/MLP -> q_o."""

    def __init__(self, c: int, skip_channels: tuple[int, int], num_queries: int, num_heads: int,
                 num_layers: int, separable: bool = True) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(c, skip_channels, separable)
        self.level_embed = nn.Embedding(NUM_SCALES, c)
        self.query_feat = nn.Embedding(num_queries, c)     # learnable queries q (N x C)
        self.query_embed = nn.Embedding(num_queries, c)    # their positional embeddings
        self.cross_layers = nn.ModuleList(CrossAttentionLayer(c, num_heads) for _ in range(num_layers))
        self.self_layers = nn.ModuleList(SelfAttentionLayer(c, num_heads) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(c, FFN_EXPANSION * c) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(c)
        self.mask_embed = MLP(c, c, c, 3)
        self.out_self_attn = SelfAttentionLayer(c, num_heads)
        self.out_mlp = FFNLayer(c, FFN_EXPANSION * c)

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor, projected: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer prediction: normed query state and its mask logits, mask_embed(state) . mask features.

        ``projected`` False: ``mask_features`` is F_P2 before the pixel decoder's 1x1 projection (W, b); then the
        projection moves to the queries, (E W) . F_P2 + E b, which is the same product for N queries instead of
        every pixel."""
        state = self.decoder_norm(q)
        embed = self.mask_embed(state)
        if projected:
            return state, torch.einsum("bnc,bchw->bnhw", embed, mask_features)
        proj = self.pixel_decoder.mask_features
        logits = torch.einsum("bnc,bchw->bnhw", embed @ proj.weight.flatten(1), mask_features)
        return state, logits + (embed @ proj.bias)[..., None, None]

    def forward(self, x4: torch.Tensor, f_s3: torch.Tensor, f_s2: torch.Tensor, *, layer_outputs: bool = True
                ) -> OQGOutput:
        """q_o; with ``layer_outputs`` also every layer's state and stride-4 mask logits (the training head's
        input). Without them (inference) each attention mask is predicted directly at its attention scale: the
        prediction is linear in the mask features, so resizing the features instead of the logits gives the same
        mask, for 1/16 (stride 16) or 1/4 (stride 8) of the work, the mask features' 1x1 projection is folded
        into the queries, and the last layer's masks are not computed."""
        if layer_outputs:
            scales, mask_features = self.pixel_decoder(x4, f_s3, f_s2)
        else:
            scales = self.pixel_decoder.scales(x4, f_s3, f_s2)
            mask_features = scales[-1]  # unprojected, see _predict
        sizes = [tuple(s.shape[-2:]) for s in scales]
        memories = [to_tokens(s) + self.level_embed.weight[i] for i, s in enumerate(scales)]
        pos = [to_tokens(sine_position_embedding(*size, s.shape[1], device=s.device, dtype=s.dtype))
               for size, s in zip(sizes, scales)]
        b = x4.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        q = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        if layer_outputs:
            features_at = [mask_features] * NUM_SCALES
        else:  # the mask features at each attention scale, resized as query_attention_mask resizes logits
            features_at = [mask_features if size == tuple(mask_features.shape[-2:]) else
                           F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                           for size in sizes]

        states: list[torch.Tensor] = []
        mask_logits: list[torch.Tensor] = []
        state = logits = None
        num_layers = len(self.cross_layers)
        for i in range(num_layers + 1):
            if layer_outputs or i < num_layers:  # the prediction after the last layer only feeds the training head
                state, logits = self._predict(q, features_at[i % NUM_SCALES], projected=layer_outputs)
                if layer_outputs:
                    states.append(state)
                    mask_logits.append(logits)
            if i == num_layers:
                break
            level = i % NUM_SCALES
            attn_mask = query_attention_mask(logits, sizes[level])
            q = self.cross_layers[i](q, memories[level], attn_mask=attn_mask, pos=pos[level], query_pos=query_pos)
            q = self.ffn_layers[i](self.self_layers[i](q, query_pos))
        if not layer_outputs:
            state = self.decoder_norm(q)
        q_o = self.out_mlp(self.out_self_attn(state, query_pos))
        return OQGOutput(q_o=q_o, states=states, mask_logits=mask_logits)
