# SPDX-License-Identifier: GPL-3.0-or-later
"""Backbones that produce the feature pyramid F_k = {F_s1, F_s2, F_s3, F_s4} (Section 3), and RVM's LR-ASPP.

Both encoders are written here (torchvision is not available) with *exactly* torchvision's module names, so that
state-dict keys read like ``features.4.block.2.fc1.weight`` / ``layer4.0.conv2.weight`` and RVM's pretrained
weights map onto them one to one. As in RVM the last stage is dilated instead of strided: F_s4 stays at stride 16,
which is the resolution PFE, OQG and OGCR work at.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding (needed to reproduce its squeeze-excitation widths)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _Normalize(nn.Module):
    """ImageNet normalisation inside the encoder (as RVM), so callers feed plain 0..1 RGB."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def conv_norm_act(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1,
                  act: type[nn.Module] | None = nn.ReLU, bn_eps: float = 1e-5, bn_momentum: float = 0.1
                  ) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: Sequential(conv, bn[, act]) with keys ``0.weight``, ``1.weight``..."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum),
    ]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- MobileNetV3-Large

class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's hard-sigmoid gate (keys ``fc1``, ``fc2``)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


@dataclass(frozen=True)
class _Bneck:
    in_ch: int
    kernel: int
    exp_ch: int
    out_ch: int
    use_se: bool
    use_hs: bool
    stride: int
    dilation: int


# torchvision's mobilenet_v3_large table with dilated=True (as RVM): the last three blocks trade stride 2 for
# dilation 2, so the final map stays at stride 16.
_MNV3_LARGE = (
    _Bneck(16, 3, 16, 16, False, False, 1, 1),
    _Bneck(16, 3, 64, 24, False, False, 2, 1),
    _Bneck(24, 3, 72, 24, False, False, 1, 1),
    _Bneck(24, 5, 72, 40, True, False, 2, 1),
    _Bneck(40, 5, 120, 40, True, False, 1, 1),
    _Bneck(40, 5, 120, 40, True, False, 1, 1),
    _Bneck(40, 3, 240, 80, False, True, 2, 1),
    _Bneck(80, 3, 200, 80, False, True, 1, 1),
    _Bneck(80, 3, 184, 80, False, True, 1, 1),
    _Bneck(80, 3, 184, 80, False, True, 1, 1),
    _Bneck(80, 3, 480, 112, True, True, 1, 1),
    _Bneck(112, 3, 672, 112, True, True, 1, 1),
    _Bneck(112, 5, 672, 160, True, True, 2, 2),
    _Bneck(160, 5, 960, 160, True, True, 1, 2),
    _Bneck(160, 5, 960, 160, True, True, 1, 2),
)
_MNV3_BN = dict(bn_eps=0.001, bn_momentum=0.01)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 block: ``block`` = [expand] -> depthwise -> [SE] -> project (+ identity)."""

    def __init__(self, cnf: _Bneck) -> None:
        super().__init__()
        act = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cnf.exp_ch != cnf.in_ch:
            layers.append(conv_norm_act(cnf.in_ch, cnf.exp_ch, 1, act=act, **_MNV3_BN))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(conv_norm_act(cnf.exp_ch, cnf.exp_ch, cnf.kernel, stride, groups=cnf.exp_ch,
                                    dilation=cnf.dilation, act=act, **_MNV3_BN))
        if cnf.use_se:
            layers.append(SqueezeExcitation(cnf.exp_ch, _make_divisible(cnf.exp_ch // 4, 8)))
        layers.append(conv_norm_act(cnf.exp_ch, cnf.out_ch, 1, act=None, **_MNV3_BN))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = cnf.stride == 1 and cnf.in_ch == cnf.out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3LargeEncoder(nn.Module):
    """RVM's MobileNetV3-Large encoder: pyramid F_s1..F_s4 = features[1], [3], [6], [16] (strides 2, 4, 8, 16)."""

    channels: tuple[int, int, int, int] = (16, 24, 40, 960)

    def __init__(self) -> None:
        super().__init__()
        self.normalize = _Normalize()
        layers: list[nn.Module] = [conv_norm_act(3, 16, 3, 2, act=nn.Hardswish, **_MNV3_BN)]
        layers += [InvertedResidual(cnf) for cnf in _MNV3_LARGE]
        layers.append(conv_norm_act(160, 960, 1, act=nn.Hardswish, **_MNV3_BN))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(x)
        pyramid = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 3, 6, 16):
                pyramid.append(x)
        return pyramid


# ----------------------------------------------------------------------------------------------------- ResNet-50

class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (expansion 4), keys ``conv1/bn1/conv2/bn2/conv3/bn3/downsample``."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50Encoder(nn.Module):
    """RVM's ResNet-50 encoder (layer4 dilated): pyramid conv1-relu (/2), layer1 (/4), layer2 (/8), layer4 (/16)."""

    channels: tuple[int, int, int, int] = (64, 256, 512, 2048)

    def __init__(self) -> None:
        super().__init__()
        self.normalize = _Normalize()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._in_ch, self._dilation = 64, 1
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2, dilate=True)

    def _make_layer(self, width: int, blocks: int, stride: int, dilate: bool = False) -> nn.Sequential:
        """torchvision's ``replace_stride_with_dilation`` rule: the first block keeps the previous dilation."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_ch = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self._in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        layers = [Bottleneck(self._in_ch, width, stride, previous_dilation, downsample)]
        layers += [Bottleneck(out_ch, width, 1, self._dilation) for _ in range(1, blocks)]
        self._in_ch = out_ch
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        f1 = x
        f2 = self.layer1(self.maxpool(x))
        f3 = self.layer2(f2)
        f4 = self.layer4(self.layer3(f3))
        return [f1, f2, f3, f4]


def build_backbone(name: str) -> nn.Module:
    """The encoder named by ``OAVMConfig.backbone``."""
    if name == "mobilenetv3_large":
        return MobileNetV3LargeEncoder()
    if name == "resnet50":
        return ResNet50Encoder()
    raise ValueError(f"unknown backbone {name!r}; use 'mobilenetv3_large' or 'resnet50'")


# ------------------------------------------------------------------------------------------------------- LR-ASPP

class LRASPP(nn.Module):
    """RVM's Lite R-ASPP on F_s4: ``aspp1(x) * aspp2(x)``; its C-channel output is the pixel feature x4."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.aspp1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.aspp2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                   nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp1(x) * self.aspp2(x)


__all__ = ["MobileNetV3LargeEncoder", "ResNet50Encoder", "LRASPP", "build_backbone", "conv_norm_act",
           "IMAGENET_MEAN", "IMAGENET_STD"]
