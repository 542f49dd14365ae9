# SPDX-License-Identifier: GPL-3.0-or-later
"""Inference-time rewrites that change no result beyond float rounding: batch norm folded into convolutions,
the decoder's zero-state ConvGRU gates computed by one convolution and one sigmoid, and attention of few queries
over many keys (OQG's queries over the pixel decoder's maps, OGCR's queries over the frame) computed without
projecting the keys and values (:meth:`MultiHeadAttention._folded`: 0.94-0.95x the time of a 512x288@1 CPU step,
in-process A/B).

Training keeps the modules as the paper and RVM's weights name them (``decode3.gru.ih.0.weight`` ...); the
engine applies :func:`optimize_for_inference` to its own copy of the network. The batch norms showed as much time
as the whole PFE in a CPU profile (most are the identity after RVM's import), and the fused gates halve the
decoder's GRU convolutions; measured together on a 2-core CPU at 512x288: 2.5 % faster per frame.
"""
from __future__ import annotations

import torch
from torch import nn

from .decoder import ZeroStateConvGRU
from .layers import MultiHeadAttention


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) with the running statistics (eval-mode batch norm is a per-channel affine map)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, bn name) for each Conv2d directly followed by its BatchNorm2d.

    "Followed" means adjacent in an ``nn.Sequential`` (torchvision's Conv2dNormActivation, RVM's decoder blocks,
    LR-ASPP, ResNet's downsample) or named ``convN``/``bnN`` in the same module (ResNet's stem and bottlenecks,
    whose forward applies bnN right after convN).
    """
    pairs = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                if isinstance(parent._modules[a], nn.Conv2d) and isinstance(parent._modules[b], nn.BatchNorm2d):
                    pairs.append((parent, a, b))
        else:
            for name, child in parent.named_children():
                bn_name = "bn" + name[len("conv"):]
                if (name.startswith("conv") and isinstance(child, nn.Conv2d)
                        and isinstance(getattr(parent, bn_name, None), nn.BatchNorm2d)):
                    pairs.append((parent, name, bn_name))
    return pairs


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fold every eval-mode batch norm into its convolution, fuse the decoder's GRU gates and let attention
    fold its key/value projections where that is cheaper, in place.

    The model must be in eval mode (training batch norm has no fixed affine map) and is meant for inference
    only afterwards: its state dict no longer has the batch-norm entries.
    """
    if model.training:
        raise ValueError("optimize_for_inference needs a model in eval mode (call model.eval() first)")
    for parent, conv_name, bn_name in _conv_bn_pairs(model):
        fold_batch_norm(getattr(parent, conv_name), getattr(parent, bn_name))
        setattr(parent, bn_name, nn.Identity())
    for module in model.modules():
        if isinstance(module, ZeroStateConvGRU):
            module.fuse()
        elif isinstance(module, MultiHeadAttention):
            module.fold_projections = True
    return model
