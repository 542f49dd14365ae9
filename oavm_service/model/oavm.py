# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM (Fig. 2a): RVM's matting network with the paper's PFE, OQG and OGCR modules inserted.

One frame's way through the network, split at the granularity the streaming engine needs:

* :meth:`OAVM.encode_frame` - once per frame, shared by all objects: downsample to the network resolution, pad
  to a multiple of 16, backbone pyramid F_s1..F_s4, LR-ASPP -> x4, source pyramid, PFE key of the frame.
* :meth:`OAVM.generate_queries` - once per frame, shared: OQG -> q_o (+ per-layer outputs for training).
* :meth:`OAVM.prompt` - per object at a prompt frame: the given mask becomes the long- and short-term memory and
  the carried mask (at the prompt frame PFE is thus self-attention, as the paper says).
* :meth:`OAVM.advance` - per object, batched over objects: PFE -> OGCR (with the previous mask) -> decoder ->
  heads (+ refiner), and the next :class:`ObjectState` (short-term memory and mask := this frame's prediction).

:meth:`OAVM.forward_clip` runs exactly these steps over T frames; the engine runs them frame by frame.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import LRASPP, build_backbone
from .config import OAVMConfig
from .decoder import MattingDecoder
from .ogcr import ObjectGuidedCorrectionRefinement, resample_mask
from .oqg import ObjectQueryGeneration, OQGOutput
from .pfe import Memory, PixelFeatureExtraction
from .refiner import DeepGuidedFilterRefiner
from .set_prediction import SetPredictionHead

STRIDE = 16  # output stride of the backbone; network inputs are padded to a multiple of it


@dataclass
class FrameFeatures:
    """Everything computed once per frame and shared by all objects of that frame."""

    src: torch.Tensor                 # (B, 3, H, W) input frame, 0..1
    src_sm: torch.Tensor              # (B, 3, Hp, Wp) network-resolution frame padded to a multiple of 16
    size_sm: tuple[int, int]          # network resolution before padding
    f1: torch.Tensor                  # F_s1 (stride 2)
    f2: torch.Tensor                  # F_s2 (stride 4)
    f3: torch.Tensor                  # F_s3 (stride 8)
    x4: torch.Tensor                  # LR-ASPP(F_s4): C-channel pixel features at stride 16
    src_pyramid: list[torch.Tensor]   # src_sm average-pooled 2x, 4x, 8x
    key: torch.Tensor                 # PFE key/query embedding of x4

    @property
    def batch(self) -> int:
        return self.x4.shape[0]

    def repeat(self, n: int) -> "FrameFeatures":
        """The same frame for ``n`` objects (a batch-1 frame is expanded without copying)."""
        if n == self.batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot spread a batch of {self.batch} frames over {n} objects")

        def grow(t: torch.Tensor) -> torch.Tensor:
            return t.expand(n, *t.shape[1:])

        return FrameFeatures(**{f.name: ([grow(t) for t in v] if isinstance(v, list) else
                                         grow(v) if isinstance(v, torch.Tensor) else v)
                                for f in fields(self) for v in [getattr(self, f.name)]})


@dataclass
class ObjectState:
    """What the network carries for one object (or a batch of objects) from frame to frame. Size O(1) in time.

    long_*: the prompt frame's memory (global attention); short_*: the previous frame's memory (local
    attention); prev_mask: S_{k-1} on the stride-16 grid, for the cross-frame guidance of OGCR.
    """

    long_key: torch.Tensor
    long_value: torch.Tensor
    short_key: torch.Tensor
    short_value: torch.Tensor
    prev_mask: torch.Tensor

    @property
    def long_term(self) -> Memory:
        return Memory(self.long_key, self.long_value)

    @property
    def short_term(self) -> Memory:
        return Memory(self.short_key, self.short_value)

    @property
    def batch(self) -> int:
        return self.prev_mask.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def cat(cls, states: list["ObjectState"]) -> "ObjectState":
        """Batch several objects' states along dim 0 (objects are processed together)."""
        if len(states) == 1:
            return states[0]
        return cls(**{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields(cls)})

    def split(self) -> list["ObjectState"]:
        """Undo :meth:`cat`: one state per object (views; the caller may ``clone`` to own them)."""
        parts = {name: t.split(1) for name, t in self.tensors().items()}
        return [ObjectState(**{name: parts[name][i] for name in parts}) for i in range(self.batch)]


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Replicate-pad (bottom/right) to a multiple of ``stride``, so every pyramid level has an exact size."""
    h, w = x.shape[-2:]
    ph, pw = -h % stride, -w % stride
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def network_size(h: int, w: int, downsample_ratio: float) -> tuple[int, int]:
    """Resolution the network runs at for an (h, w) frame."""
    if downsample_ratio == 1.0:
        return h, w
    return max(1, round(h * downsample_ratio)), max(1, round(w * downsample_ratio))


class OAVM(nn.Module):
    """Object-Aware Video Matting network. See the module docstring for the streaming granularity."""

    def __init__(self, config: OAVMConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or OAVMConfig()
        self.backbone = build_backbone(cfg.backbone)
        ch = self.backbone.channels
        self.aspp = LRASPP(ch[3], cfg.c)
        self.pfe = PixelFeatureExtraction(cfg.c, cfg.key_dim, cfg.window)
        self.oqg = ObjectQueryGeneration(cfg.c, (ch[2], ch[1]), cfg.num_queries, cfg.num_heads,
                                         cfg.num_decoder_layers, separable=cfg.pixel_decoder == "separable")
        self.ogcr = ObjectGuidedCorrectionRefinement(cfg.c, cfg.num_queries, cfg.num_heads, cfg.dilation_ks)
        self.decoder = MattingDecoder((ch[0], ch[1], ch[2], cfg.c), cfg.decoder_channels)
        hid = cfg.decoder_channels[-1]
        self.project_mat = nn.Conv2d(hid, 4, 1)   # 3 foreground residual + 1 alpha
        self.project_seg = nn.Conv2d(hid, 1, 1)   # foreground mask logits S_k
        with torch.no_grad():  # alpha starts mid-range, so clamp(0, 1) passes gradients from the first step
            self.project_mat.bias[3] = 0.5          # (pretrained RVM weights replace this)
        self.refiner = DeepGuidedFilterRefiner(hid)
        self.set_prediction = SetPredictionHead(cfg.c, cfg.num_classes) if cfg.train_heads else None

    # ------------------------------------------------------------------------------------- per frame (shared)

    def encode_frame(self, src: torch.Tensor, downsample_ratio: float = 1.0) -> FrameFeatures:
        """Backbone + LR-ASPP + source pyramid + PFE key of a (B, 3, H, W) frame in 0..1."""
        if not 0.0 < downsample_ratio <= 1.0:
            raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}")
        size_sm = network_size(src.shape[-2], src.shape[-1], downsample_ratio)
        src_sm = src if size_sm == tuple(src.shape[-2:]) else \
            F.interpolate(src, size=size_sm, mode="bilinear", align_corners=False, antialias=True)
        src_sm = pad_to_stride(src_sm)
        f1, f2, f3, f4 = self.backbone(src_sm)
        x4 = self.aspp(f4)
        return FrameFeatures(src=src, src_sm=src_sm, size_sm=size_sm, f1=f1, f2=f2, f3=f3, x4=x4,
                             src_pyramid=self.decoder.source_pyramid(src_sm), key=self.pfe.key(x4))

    def generate_queries(self, feats: FrameFeatures, layer_outputs: bool | None = None) -> OQGOutput:
        """OQG on the frame (Section 3.2): q_o, and the per-layer outputs when the set-prediction head (training)
        is there to use them (``layer_outputs`` None) or when asked for."""
        if layer_outputs is None:
            layer_outputs = self.set_prediction is not None
        return self.oqg(feats.x4, feats.f3, feats.f2, layer_outputs=layer_outputs)

    # ---------------------------------------------------------------------------------------- per object

    def mask_to_grid(self, mask: torch.Tensor, feats: FrameFeatures) -> torch.Tensor:
        """A full-resolution (B, 1, H, W) mask in 0..1 -> the stride-16 grid of the padded network frame."""
        m = resample_mask(mask.to(feats.src_sm.dtype), feats.size_sm)
        return F.avg_pool2d(pad_to_stride(m), STRIDE)

    def prompt(self, feats: FrameFeatures, mask: torch.Tensor) -> ObjectState:
        """Start (or restart) objects from given masks: long- and short-term memory = this frame + its mask."""
        grid = self.mask_to_grid(mask, feats)
        f = feats.repeat(grid.shape[0])
        memory = self.pfe.memorize(f.x4, grid, key=f.key)
        return ObjectState(memory.key, memory.value, memory.key, memory.value, grid)

    def advance(self, feats: FrameFeatures, queries: OQGOutput, state: ObjectState, foreground: bool = True
                ) -> tuple[dict[str, torch.Tensor], ObjectState]:
        """Matte the frame for every object in ``state`` (batched) and return the states for the next frame.

        ``foreground`` False: skip the foreground colour (``out["fgr"]`` is None), which saves a quarter of the
        full-resolution refinement when the caller only wants mattes."""
        n = state.batch
        f = feats.repeat(n)
        q_o = queries.q_o if queries.q_o.shape[0] == n else queries.q_o.expand(n, -1, -1)
        f_m = self.pfe(f.x4, f.key, state.long_term, state.short_term)       # Eq. 2-4
        f_alpha = self.ogcr(f_m, q_o, state.prev_mask)                        # Eq. 5-7
        hid = self.decoder(f_alpha, f.f1, f.f2, f.f3, f.src_sm, *f.src_pyramid)
        out, seg_grid = self._heads(hid, f, foreground)
        memory = self.pfe.memorize(f.x4, seg_grid, key=f.key)
        return out, replace(state, short_key=memory.key, short_value=memory.value, prev_mask=seg_grid)

    def _heads(self, hid: torch.Tensor, f: FrameFeatures, foreground: bool = True
               ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """project_mat / project_seg, crop the padding, refine to full resolution when the network ran smaller."""
        seg_logits = self.project_seg(hid)
        seg_grid = F.avg_pool2d(torch.sigmoid(seg_logits.float()), STRIDE)  # S_k for memory and guidance
        fgr_res, pha = self.project_mat(hid).split([3, 1], dim=1)
        hs, ws = f.size_sm
        crop = (..., slice(0, hs), slice(0, ws))
        fgr_res, pha, seg_logits, hid = fgr_res[crop], pha[crop], seg_logits[crop], hid[crop]
        full = tuple(f.src.shape[-2:])
        if (hs, ws) != full:
            fgr_res, pha = self.refiner(f.src, f.src_sm[crop], fgr_res, pha, hid, alpha_only=not foreground)
            seg_logits = F.interpolate(seg_logits, size=full, mode="bilinear", align_corners=False)
        return {"alpha": pha.clamp(0.0, 1.0), "fgmask": torch.sigmoid(seg_logits), "fgmask_logits": seg_logits,
                "fgr": (fgr_res + f.src).clamp(0.0, 1.0) if foreground else None}, seg_grid

    # ------------------------------------------------------------------------------------------ clips

    def forward_clip(self, frames: torch.Tensor, first_mask: torch.Tensor, downsample_ratio: float = 1.0
                     ) -> dict[str, torch.Tensor | list]:
        """Run the streaming path over a clip: frames (B, T, 3, H, W) in 0..1, first_mask (B, 1, H, W).

        Frame 0 is the prompt frame; each later frame uses the previous prediction as its mask. Returns alpha,
        fgmask, fgmask_logits (B, T, 1, H, W) and fgr (B, T, 3, H, W); with ``config.train_heads`` also ``aux``:
        per frame, the set-prediction outputs of every OQG layer (see :class:`SetPredictionHead`), mask logits
        cropped to the un-padded network frame (stride 4 of ``downsample_ratio`` * H, W, rounded up).
        """
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        if first_mask.shape != (frames.shape[0], 1, *frames.shape[-2:]):
            raise ValueError(f"first_mask must be (B, 1, H, W) = {(frames.shape[0], 1, *frames.shape[-2:])}, "
                             f"got {tuple(first_mask.shape)}")
        per_frame: list[dict[str, torch.Tensor]] = []
        aux = []
        state: ObjectState | None = None
        for t in range(frames.shape[1]):
            feats = self.encode_frame(frames[:, t], downsample_ratio)
            queries = self.generate_queries(feats)
            if state is None:
                state = self.prompt(feats, first_mask)
            out, state = self.advance(feats, queries, state)
            per_frame.append(out)
            if self.set_prediction is not None:
                aux.append(self._crop_aux(self.set_prediction(queries), feats))
        result: dict[str, torch.Tensor | list] = {k: torch.stack([o[k] for o in per_frame], dim=1)
                                                  for k in per_frame[0]}
        if self.set_prediction is not None:
            result["aux"] = aux
        return result

    forward = forward_clip

    @staticmethod
    def _crop_aux(layers: list[dict[str, torch.Tensor]], feats: FrameFeatures) -> list[dict[str, torch.Tensor]]:
        h4, w4 = -(-feats.size_sm[0] // 4), -(-feats.size_sm[1] // 4)
        return [{**d, "pred_masks": d["pred_masks"][..., :h4, :w4]} for d in layers]

    # ------------------------------------------------------------------------------------------ init

    def zero_residual_branches(self) -> None:
        """Zero the output layers of the residual branches of PFE and OGCR.

        Then F_m = x4 and F_alpha = F_m, i.e. an RVM-initialised OAVM starts as "RVM without recurrence" and
        learns from there to use the memory and the mask guidance (called by the RVM importer).
        """
        nn.init.zeros_(self.pfe.out.weight)
        nn.init.zeros_(self.pfe.out.bias)
        self.ogcr.zero_residual_outputs()
