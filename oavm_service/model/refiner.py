# SPDX-License-Identifier: GPL-3.0-or-later
"""RVM's Deep Guided Filter refiner: the network runs at ``downsample_ratio`` of the input and this restores
full-resolution foreground/alpha edges guided by the full-resolution image. This is what makes 4K frames fit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DeepGuidedFilterRefiner(nn.Module):
    """Learned guided filter (Wu et al.): local linear model y = A x + b fitted at low res, applied at full res."""

    def __init__(self, hid_channels: int = 16) -> None:
        super().__init__()
        self.box_filter = nn.Conv2d(4, 4, kernel_size=3, padding=1, bias=False, groups=4)
        with torch.no_grad():
            self.box_filter.weight.fill_(1.0 / 9.0)
        self.conv = nn.Sequential(
            nn.Conv2d(4 * 2 + hid_channels, hid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hid_channels), nn.ReLU(inplace=True),
            nn.Conv2d(hid_channels, hid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hid_channels), nn.ReLU(inplace=True),
            nn.Conv2d(hid_channels, 4, kernel_size=1, bias=True))

    def forward(self, fine_src: torch.Tensor, base_src: torch.Tensor, base_fgr: torch.Tensor,
                base_pha: torch.Tensor, base_hid: torch.Tensor, alpha_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """fine_src (B,3,H,W); base_* at low resolution. Returns full-resolution (fgr residual, alpha).

        ``alpha_only``: the fitted model is per channel, so alpha alone needs only its own channel at full
        resolution, a quarter of the full-resolution work (which dominates at 1080p and 4K); fgr is then None.
        """
        fine_grey = fine_src.mean(1, keepdim=True)
        base_x = torch.cat([base_src, base_src.mean(1, keepdim=True)], dim=1)
        base_y = torch.cat([base_fgr, base_pha], dim=1)
        mean_x = self.box_filter(base_x)
        mean_y = self.box_filter(base_y)
        cov_xy = self.box_filter(base_x * base_y) - mean_x * mean_y
        var_x = self.box_filter(base_x * base_x) - mean_x * mean_x
        a = self.conv(torch.cat([cov_xy, var_x, base_hid], dim=1))
        b = mean_y - a * mean_x
        size = fine_src.shape[-2:]
        if alpha_only:  # alpha's guide is the grey image
            a = F.interpolate(a[:, 3:], size, mode="bilinear", align_corners=False)
            b = F.interpolate(b[:, 3:], size, mode="bilinear", align_corners=False)
            return None, a * fine_grey + b
        fine_x = torch.cat([fine_src, fine_grey], dim=1)
        a = F.interpolate(a, size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size, mode="bilinear", align_corners=False)
        out = a * fine_x + b
        fgr, pha = out.split([3, 1], dim=1)
        return fgr, pha
