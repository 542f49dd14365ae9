# SPDX-License-Identifier: GPL-3.0-or-later
"""Training losses of OAVM, each from the work it is taken from.

* Matting (alpha, foreground): RVM (Lin et al., WACV 2022, ``train_loss.py``): L1 + Laplacian-pyramid loss on
  alpha, temporal coherence (MSE between predicted and true frame-to-frame differences, weight 5), L1 + coherence
  on the foreground colour inside the true alpha.
* Foreground mask S_k (Section 3.4 of the OAVM paper: the decoder also predicts a segmentation mask): binary
  cross-entropy + dice, as mask losses in Mask2Former.
* Set prediction (Section 3.4: "mask classification strategy similar to [3]" with an auxiliary loss on every
  transformer layer and on the queries before the decoder): Mask2Former's loss (Cheng et al., CVPR 2022) - class
  cross-entropy with the no-object class weighted 0.1, and sigmoid BCE + dice on Hungarian-matched pairs
  (:mod:`oavm_service.train.matcher`).

Tensors are ``(B, T, C, H, W)`` per clip unless said otherwise; every loss returns a scalar tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .matcher import MatchCost, hungarian_match

__all__ = [
    "LossConfig", "laplacian_loss", "temporal_coherence", "matting_loss", "dice_loss", "segmentation_loss",
    "SetTarget", "set_prediction_loss", "total_loss",
]


@dataclass(frozen=True)
class LossConfig:
    """Weights of every term. Defaults: RVM for matting, Mask2Former for the set prediction."""

    alpha_l1: float = 1.0
    alpha_laplacian: float = 1.0
    alpha_coherence: float = 5.0   # RVM multiplies its coherence MSE terms by 5
    fgr_l1: float = 1.0
    fgr_coherence: float = 5.0
    mask_bce: float = 1.0
    mask_dice: float = 1.0
    set_scale: float = 1.0         # one factor on the whole set-prediction loss (all layers)
    set_class: float = 2.0         # Mask2Former: class 2.0, mask 5.0, dice 5.0, no-object 0.1
    set_mask: float = 5.0
    set_dice: float = 5.0
    no_object_weight: float = 0.1
    laplacian_levels: int = 5

    def match_cost(self) -> MatchCost:
        """The matcher uses the same weights as the loss, as in Mask2Former."""
        return MatchCost(self.set_class, self.set_mask, self.set_dice)


# ------------------------------------------------------------------------------------------------- matting (RVM)

def _gauss_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype)
    return (k[:, None] * k[None, :] / 256.0)[None, None]


def _gauss(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    n, c, h, w = img.shape
    out = F.conv2d(F.pad(img.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect"), kernel)
    return out.reshape(n, c, h, w)


def _laplacian_pyramid(img: torch.Tensor, levels: int) -> list[torch.Tensor]:
    kernel = _gauss_kernel(img.device, img.dtype)
    pyramid, current = [], img
    for _ in range(levels):
        h, w = current.shape[-2:]
        current = current[..., : h - h % 2, : w - w % 2]
        down = _gauss(current, kernel)[..., ::2, ::2]
        up = torch.zeros_like(current)
        up[..., ::2, ::2] = down * 4.0
        pyramid.append(current - _gauss(up, kernel))
        current = down
    return pyramid


def laplacian_loss(pred: torch.Tensor, true: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """RVM's Laplacian loss: ``sum_l 2^l * L1(Lap_l(pred), Lap_l(true)) / levels`` on ``(N, C, H, W)`` images.

    Needs ``min(H, W) >= 2 ** (levels + 1)`` so the coarsest level can still be reflect-padded.
    """
    if min(pred.shape[-2:]) < 2 ** (levels + 1):
        raise ValueError(f"Laplacian loss with {levels} levels needs frames of at least {2 ** (levels + 1)} px; got "
                         f"{tuple(pred.shape[-2:])}. Train at a larger resolution or lower laplacian_levels.")
    total = pred.new_zeros(())
    for level, (p, t) in enumerate(zip(_laplacian_pyramid(pred, levels), _laplacian_pyramid(true, levels))):
        total = total + (2 ** level) * F.l1_loss(p, t)
    return total / levels


def temporal_coherence(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """RVM's coherence term: MSE between predicted and true frame-to-frame changes, ``(B, T, C, H, W)``."""
    if pred.shape[1] < 2:
        return pred.new_zeros(())
    return F.mse_loss(pred[:, 1:] - pred[:, :-1], true[:, 1:] - true[:, :-1])


def matting_loss(pred_alpha: torch.Tensor, true_alpha: torch.Tensor, cfg: LossConfig = LossConfig(), *,
                 pred_fgr: torch.Tensor | None = None, true_fgr: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """RVM's matting loss on clips ``(B, T, 1, H, W)`` (alpha) and ``(B, T, 3, H, W)`` (foreground colour).

    The foreground colour is only defined where the object is (``true_alpha > 0``), so it is compared there only.
    """
    loss = {
        "alpha_l1": F.l1_loss(pred_alpha, true_alpha),
        "alpha_laplacian": laplacian_loss(pred_alpha.flatten(0, 1), true_alpha.flatten(0, 1), cfg.laplacian_levels),
        "alpha_coherence": temporal_coherence(pred_alpha, true_alpha),
    }
    if pred_fgr is not None and true_fgr is not None:
        inside = (true_alpha > 0).to(pred_fgr.dtype)
        loss["fgr_l1"] = F.l1_loss(pred_fgr * inside, true_fgr * inside)
        loss["fgr_coherence"] = temporal_coherence(pred_fgr * inside, true_fgr * inside)
    return loss


# ------------------------------------------------------------------------------------------- foreground mask S_k

def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` over the leading dimension of ``(N, ...)`` masks."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    return (1.0 - (2.0 * (probs * targets).sum(-1) + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)).mean()


def segmentation_loss(mask_logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE + dice on the foreground-mask logits ``(B, T, 1, H, W)`` against the binary target."""
    return {"mask_bce": F.binary_cross_entropy_with_logits(mask_logits, target),
            "mask_dice": dice_loss(mask_logits.flatten(0, 1), target.flatten(0, 1))}


# --------------------------------------------------------------------------------------- set prediction (M2F)

@dataclass
class SetTarget:
    """The instance targets of one frame: ``labels (K,)`` class indices and binary ``masks (K, H, W)``."""

    labels: torch.Tensor
    masks: torch.Tensor


@dataclass
class _LayerOutput:
    class_logits: torch.Tensor  # (N, Q, C + 1), last = no object
    mask_logits: torch.Tensor   # (N, Q, h, w)


def _targets_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Targets resampled to the prediction's resolution (area average keeps thin objects as soft values)."""
    if masks.shape[-2:] == size:
        return masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[None].float(), size=size, mode="area")[0]


def _layer_loss(layer: _LayerOutput, targets: list[SetTarget], cfg: LossConfig, num_masks: float
                ) -> dict[str, torch.Tensor]:
    n, q, c1 = layer.class_logits.shape
    class_weight = torch.ones(c1, device=layer.class_logits.device)
    class_weight[-1] = cfg.no_object_weight
    class_target = torch.full((n, q), c1 - 1, dtype=torch.long, device=layer.class_logits.device)
    matched_pred, matched_true = [], []
    for i, target in enumerate(targets):
        masks = target.masks
        rows, cols = hungarian_match(layer.class_logits[i], layer.mask_logits[i], target.labels, masks,
                                     cfg.match_cost())
        class_target[i, rows] = target.labels[cols].to(class_target.device)
        matched_pred.append(layer.mask_logits[i, rows])
        matched_true.append(masks[cols])
    loss_class = F.cross_entropy(layer.class_logits.float().transpose(1, 2), class_target, weight=class_weight)
    pred = torch.cat(matched_pred).float().flatten(1)
    true = torch.cat(matched_true).flatten(1)
    if pred.shape[0] == 0:
        zero = layer.mask_logits.sum() * 0.0
        return {"set_class": loss_class, "set_mask": zero, "set_dice": zero}
    loss_mask = F.binary_cross_entropy_with_logits(pred, true, reduction="none").mean(1).sum() / num_masks
    probs = pred.sigmoid()
    dice = 1.0 - (2.0 * (probs * true).sum(-1) + 1.0) / (probs.sum(-1) + true.sum(-1) + 1.0)
    return {"set_class": loss_class, "set_mask": loss_mask, "set_dice": dice.sum() / num_masks}


def set_prediction_loss(layers: list[tuple[torch.Tensor, torch.Tensor]], targets: list[SetTarget],
                        cfg: LossConfig = LossConfig()) -> dict[str, torch.Tensor]:
    """Mask2Former's set loss summed over ``layers`` = [(class_logits (N,Q,C+1), mask_logits (N,Q,h,w)), ...].

    Pass the predictions from the queries before the transformer decoder and after each of its layers (Section
    3.4); ``targets`` has one :class:`SetTarget` per frame ``N``. Each layer is matched separately, as in
    Mask2Former. Mask terms are normalised by the number of target instances in the batch.
    """
    num_masks = max(float(sum(int(t.labels.numel()) for t in targets)), 1.0)
    total: dict[str, torch.Tensor] = {}
    resampled: dict[tuple[int, int], list[SetTarget]] = {}   # every layer predicts at the same size: resample once
    for class_logits, mask_logits in layers:
        if class_logits.shape[0] != len(targets):
            raise ValueError(f"set prediction: {class_logits.shape[0]} frames of predictions, {len(targets)} targets")
        size = tuple(mask_logits.shape[-2:])
        if size not in resampled:
            resampled[size] = [SetTarget(t.labels.to(mask_logits.device),
                                         _targets_at(t.masks.to(mask_logits.device), size)) for t in targets]
        layer_targets = resampled[size]
        for key, value in _layer_loss(_LayerOutput(class_logits, mask_logits), layer_targets, cfg, num_masks).items():
            total[key] = total.get(key, 0.0) + value
    return total


# -------------------------------------------------------------------------------------------------------- total

@dataclass
class WeightedLoss:
    """The weighted sum and its parts (detached floats, for logging)."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def total_loss(parts: dict[str, torch.Tensor], cfg: LossConfig = LossConfig()) -> WeightedLoss:
    """Weight and sum the named terms; set-prediction terms are also scaled by ``cfg.set_scale``."""
    total = None
    for name, value in parts.items():
        weight = getattr(cfg, name)
        if name.startswith("set_"):
            weight *= cfg.set_scale
        term = weight * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no loss terms: the batch had neither alpha, mask nor instance targets")
    return WeightedLoss(total, {k: float(v.detach()) for k, v in parts.items()} | {"total": float(total.detach())})
