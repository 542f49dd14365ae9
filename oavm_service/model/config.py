# SPDX-License-Identifier: GPL-3.0-or-later
"""The one configuration object of the OAVM network.

It is stored as JSON inside every checkpoint (``checkpoint.py``), so a checkpoint always rebuilds exactly the
network that wrote it. ``from_dict`` refuses unknown keys: a typo in a recipe or a checkpoint written by a newer
OAVM must fail loudly instead of silently building a different network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

BACKBONES = ("mobilenetv3_large", "resnet50")
PIXEL_DECODERS = ("separable", "full")


@dataclass(frozen=True)
class OAVMConfig:
    """Hyper-parameters of :class:`oavm_service.model.OAVM`.

    The defaults are the paper's MobileNetV3 model (Section 4.1: C=128, w=15; Table 5: ks=3) with RVM's decoder
    widths, so that RVM's pretrained weights fit.
    """

    backbone: str = "mobilenetv3_large"
    c: int = 128                      # pixel feature channels = query dimension C (= RVM's LR-ASPP width)
    key_dim: int = 64                 # key/query width of the PFE memory matching (Eq. 2)
    num_queries: int = 16             # N object queries (Section 3.2)
    num_heads: int = 4                # heads of the transformer attentions in OQG and OGCR
    num_decoder_layers: int = 3       # L transformer decoder layers in OQG (Section 3.2: L = 3)
    window: int = 15                  # w: local attention window to the short-term memory (Eq. 4)
    dilation_ks: int = 3              # ks: dilation kernel of the cross-frame guidance (Eq. 7, Table 5)
    decoder_channels: tuple[int, int, int, int] = (80, 40, 32, 16)  # RVM's decode3..decode0 widths
    pixel_decoder: str = "separable"  # OQG's "lightweight pixel decoder": depthwise-separable 3x3 convolutions;
                                      # "full": dense 3x3 (8x the work at stride 4; checkpoints before 2026-11-26)
    num_classes: int = 1              # object classes of the set-prediction head (training only)
    train_heads: bool = False         # build the set-prediction head (training); inference never needs it

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(v) for v in self.decoder_channels))
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {', '.join(BACKBONES)} (got {self.backbone!r})")
        if self.pixel_decoder not in PIXEL_DECODERS:
            problems.append(f"pixel_decoder must be one of {', '.join(PIXEL_DECODERS)} (got {self.pixel_decoder!r})")
        for name in ("c", "key_dim", "num_queries", "num_heads", "num_decoder_layers", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if isinstance(self.c, int) and isinstance(self.num_heads, int) and self.num_heads > 0 \
                and self.c % self.num_heads:
            problems.append(f"c ({self.c}) must be divisible by num_heads ({self.num_heads})")
        for name in ("window", "dilation_ks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                problems.append(f"{name} must be a positive odd integer (got {value!r})")
        if len(self.decoder_channels) != 4 or min(self.decoder_channels) < 1:
            problems.append(f"decoder_channels must be 4 positive integers (got {self.decoder_channels!r})")
        if problems:
            raise ValueError("invalid OAVMConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists) that :meth:`from_dict` turns back into an equal config."""
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OAVMConfig":
        """Build a config from :meth:`to_dict` output; unknown keys are an error (not silently dropped)."""
        if not isinstance(data, dict):
            raise ValueError(f"an OAVMConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OAVMConfig field(s) {', '.join(unknown)}; known fields are "
                             f"{', '.join(sorted(known))}. Was this written by a newer OAVM? Update OAVM or "
                             f"remove the field(s).")
        return cls(**data)

    def replace(self, **changes: Any) -> "OAVMConfig":
        """A copy with some fields changed (validated like a new config)."""
        return OAVMConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def tiny(cls, **changes: Any) -> "OAVMConfig":
        """A small network for tests and quick experiments: same structure, fewer channels and queries."""
        base = cls(c=32, key_dim=16, num_queries=4, num_heads=2, window=7, decoder_channels=(32, 24, 16, 16))
        return base.replace(**changes) if changes else base
