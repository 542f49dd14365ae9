# SPDX-License-Identifier: GPL-3.0-or-later
"""The matting decoder (Section 3.4): RVM's recurrent decoder with its ConvGRUs run from a zero state.

Temporal context comes from PFE's memory instead of RVM's recurrent states, so no hidden state is carried
between frames. RVM's ConvGRU cells are kept nevertheless, each run from h = 0 on every frame: then the cell is
a gated convolution of the current features only, ``z * tanh(conv_hh(x))`` with ``z = sigmoid(conv_ih(x))``. Its
weights are a large part of what RVM learned about mattes (dropping them costs ~65 MAD on real frames), and
module names and convolution shapes are RVM's (``decode3.conv.0.weight``, ``decode3.gru.ih.0.weight`` ...), so
RVM's pretrained decoder loads as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import cat_channels


class ZeroStateConvGRU(nn.Module):
    """RVM's ConvGRU cell evaluated with a zero hidden state: h' = z * c, z = sigmoid(ih([x, 0])), c = tanh(hh([x, 0])).

    The convolutions keep RVM's shapes (2C inputs: x and h) so its weights load unchanged; since h = 0 only the
    x half of each kernel contributes, and only that half is computed. (The r gate multiplies h and drops out.)
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.ih = nn.Sequential(nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.Sigmoid())
        self.hh = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.Tanh())
        # set by fuse(); buffers so that .to(device) moves them, non-persistent so that state dicts do not change
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def fuse(self) -> None:
        """Inference: compute both gates with one convolution and one sigmoid.

        The weights are the used halves, made contiguous once (slicing RVM's 2C-input kernels on every call copies
        them), with the candidate's rows doubled: tanh(u) = 2 sigmoid(2u) - 1, so a sigmoid over all 2C output
        channels (one contiguous map) replaces a sigmoid and a tanh over two strided halves. On a 2-core CPU the
        gates of decode1 (16 channels at 144x256) took 12.8 ms that way against 4.6 ms (the same values to
        2e-7). The state dict is unchanged."""
        c = self.channels
        ih, hh = self.ih[0], self.hh[0]
        self.fused_weight = torch.cat([ih.weight[c:, :c], 2 * hh.weight[:, :c]]).detach().contiguous()
        self.fused_bias = torch.cat([ih.bias[c:], 2 * hh.bias]).detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channels
        if self.fused_weight is not None:
            z, s = torch.sigmoid_(F.conv2d(x, self.fused_weight, self.fused_bias, padding=1)).split(c, dim=1)
            return s.mul(2).sub_(1).mul_(z)   # z * tanh(candidate)
        ih, hh = self.ih[0], self.hh[0]
        z = torch.sigmoid(F.conv2d(x, ih.weight[c:, :c], ih.bias[c:], padding=1))
        return z * torch.tanh(F.conv2d(x, hh.weight[:, :c], hh.bias, padding=1))


def _gru_on_second_half(gru: ZeroStateConvGRU, x: torch.Tensor) -> torch.Tensor:
    """RVM's blocks pass the second half of their channels through the GRU and keep the first half."""
    a, b = x.split(gru.channels, dim=1)
    return cat_channels([a, gru(b)])


class BottleneckBlock(nn.Module):
    """RVM's ``decode4``: the GRU on half of the /16 features (here F_alpha)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gru = ZeroStateConvGRU(channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gru_on_second_half(self.gru, x)


class UpsamplingBlock(nn.Module):
    """Upsample x2, crop to the skip size, concat [x, F_skip, source], Conv-BN-ReLU, GRU on half (RVM's block)."""

    def __init__(self, in_channels: int, skip_channels: int, src_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels + src_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.gru = ZeroStateConvGRU(out_channels // 2)

    def forward(self, x: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)[:, :, :s.size(2), :s.size(3)]
        return _gru_on_second_half(self.gru, self.conv(cat_channels([x, f, s])))


class OutputBlock(nn.Module):
    """Upsample x2 to full (network) resolution, concat the source image, two Conv-BN-ReLU."""

    def __init__(self, in_channels: int, src_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + src_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)[:, :, :s.size(2), :s.size(3)]
        return self.conv(cat_channels([x, s]))


class MattingDecoder(nn.Module):
    """F_alpha (/16) + F_s3, F_s2, F_s1 + source pyramid -> 16-channel hidden map at network resolution."""

    def __init__(self, feature_channels: tuple[int, int, int, int], decoder_channels: tuple[int, int, int, int]
                 ) -> None:
        super().__init__()
        fc, dc = feature_channels, decoder_channels
        self.avgpool = nn.AvgPool2d(2, 2, count_include_pad=False, ceil_mode=True)
        self.decode4 = BottleneckBlock(fc[3])
        self.decode3 = UpsamplingBlock(fc[3], fc[2], 3, dc[0])
        self.decode2 = UpsamplingBlock(dc[0], fc[1], 3, dc[1])
        self.decode1 = UpsamplingBlock(dc[1], fc[0], 3, dc[2])
        self.decode0 = OutputBlock(dc[2], 3, dc[3])

    def source_pyramid(self, s0: torch.Tensor) -> list[torch.Tensor]:
        """The source image average-pooled 2x, 4x, 8x (computed once per frame, shared by all objects)."""
        s1 = self.avgpool(s0)
        s2 = self.avgpool(s1)
        return [s1, s2, self.avgpool(s2)]

    def forward(self, f_alpha: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor,
                s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
        x3 = self.decode3(self.decode4(f_alpha), f3, s3)
        x2 = self.decode2(x3, f2, s2)
        x1 = self.decode1(x2, f1, s1)
        return self.decode0(x1, s0)
