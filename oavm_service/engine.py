# SPDX-License-Identifier: GPL-3.0-or-later
"""The streaming engine: an OAVM model on a device/precision (:class:`Engine`) and per-clip state (:class:`ClipSession`).

A session is Cutie-style: one :meth:`ClipSession.step` per frame, prompts (masks) allowed at any frame. Per
object it keeps the paper's memory (Section 3.1: the prompt frame as long-term memory, the previous frame as
short-term memory) plus the previous mask for the cross-frame guidance (Section 3.3); nothing grows with the clip
length. The backbone and OQG run once per frame; PFE, OGCR and the decoder run once for all objects together.
The engine has no notion of direction or frame numbers: the caller decides the order frames arrive in.

The engine knows no sockets and no files (the service, batch command and demo are built on it).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch

from .cuda_graphs import GraphedStep
from .errors import OAVMInputError
from .model import OAVM, ObjectState
from .model.fuse import optimize_for_inference

AUTO_MAX_SIDE = 512          # automatic downsample_ratio = min(1, AUTO_MAX_SIDE / max(H, W))
SESSION_FORMAT = "oavm-clip-session"
SESSION_VERSION = 1
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_STATE_FIELDS = tuple(f.name for f in fields(ObjectState))
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DEVICE_FRAME_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))  # others: numpy first
_NOT_FINITE = "{what} contains NaN or infinite values; fix the source pixels (e.g. np.nan_to_num)"


@dataclass
class Matte:
    """One object's result for one frame, at the input frame's full resolution."""

    alpha: np.ndarray        # (H, W) in [0, 1], float32 (or the session's output_dtype, e.g. float16)
    fgmask: np.ndarray       # (H, W) in [0, 1], the foreground (segmentation) mask S_k
    foreground: np.ndarray | None  # (H, W, 3) in [0, 1], straight (un-premultiplied) foreground colour;
                                   # None when the session was made with foreground=False


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu. Asking for an absent GPU is an input error, not a crash."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OAVMInputError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OAVMInputError(f"device {name!r} was requested but this torch build sees no CUDA GPU; "
                             f"use device 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise OAVMInputError(f"device {name!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA, fp32 on CPU; otherwise one of fp32 | fp16 | bf16."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise OAVMInputError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'fp16' or 'bf16'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OAVMInputError("this GPU does not support bf16; use precision 'fp16' or 'fp32'")
    return precision


def auto_downsample_ratio(height: int, width: int) -> float:
    """The network resolution the engine picks when none is given: long side at most 512 pixels."""
    return min(1.0, AUTO_MAX_SIDE / max(height, width))


class Engine:
    """An OAVM model placed on a device with a precision; makes :class:`ClipSession` objects."""

    def __init__(self, model: OAVM, *, device: str = "auto", precision: str = "auto",
                 checkpoint_info: dict[str, Any] | None = None, optimize: bool = True,
                 cuda_graphs: bool | None = None) -> None:
        """``optimize``: run a copy of ``model`` with batch norm folded into the convolutions and the decoder's
        gates fused (:mod:`oavm_service.model.fuse`; same results, faster); the caller's model stays trainable.
        ``cuda_graphs``: replay each clip's steady-state step as a CUDA graph (:mod:`oavm_service.cuda_graphs`);
        None: on for CUDA devices (about 5x faster steps at 1080p on an H100: docs/performance.md)."""
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise OAVMInputError(f"CUDA graphs need a CUDA device, not {self.device.type!r}; leave them off on the CPU")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.pinned_transfers = self.device.type == "cuda"   # results come back through page-locked memory
        self.frames_on_device = self.device.type == "cuda"   # frames are scaled and checked there (unit_frame),
                                                             # on the CPU by numpy before the step
        # eval mode (batch-norm statistics); gradients are off via inference_mode. Channels-last layout: tensor
        # cores on the GPU; on the CPU oneDNN's convolutions then skip reordering the full-resolution decoder
        # maps (docs/performance.md has the A/B).
        model = model.eval()
        if optimize:
            model = optimize_for_inference(copy.deepcopy(model))
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.precision == "fp16" and self.device.type == "cuda":
            # weights stored in fp16 (as the shipped checkpoint is): autocast then casts no weight per frame
            # (eager 1080p steps 28 -> 18 ms on an H100); its fp32 operations still upcast their inputs
            self.model.half()
        self.checkpoint_info = checkpoint_info or {"path": None, "sha256": None, "version": None,
                                                   "config": model.config.to_dict()}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, *, device: str = "auto",
                        precision: str = "auto", cuda_graphs: bool | None = None) -> "Engine":
        """Load a checkpoint (None: the shipped default) onto ``device``. Raises CheckpointError if unusable."""
        from .checkpoint import checkpoint_sha256, load_checkpoint, read_checkpoint_header

        header = read_checkpoint_header(path)
        dev = resolve_device(device)
        model, meta = load_checkpoint(header["path"], map_location=dev)
        info = {"path": header["path"], "sha256": checkpoint_sha256(header["path"]),
                "version": header["oavm_version"], "format_version": header["format_version"],
                "config": header["config"].to_dict(), "meta": meta}
        return cls(model, device=str(dev), precision=precision, checkpoint_info=info, cuda_graphs=cuda_graphs)

    def new_session(self, *, downsample_ratio: float | None = None, foreground: bool = True,
                    output_dtype: str = "float32") -> "ClipSession":
        """A new clip. ``downsample_ratio`` None: automatic (long side <= 512 px at the network's input).
        ``foreground`` False: mattes only (``Matte.foreground`` None), faster when the network runs downsampled.
        ``output_dtype`` "float16": mattes come back as half floats (the service's float16 replies), converted on
        the GPU before the copy to the host, which then moves half the bytes."""
        return ClipSession(self, downsample_ratio=downsample_ratio, foreground=foreground, output_dtype=output_dtype)

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """Mixed precision context for the engine's precision (a no-op for fp32)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache_enabled)


# ------------------------------------------------------------------------------------------- input checks

def _frame_to_array(frame: Any, on_device: bool = False) -> np.ndarray:
    """Validate an (H, W, 3) RGB frame and return it as float32 in [0, 1] or, with ``on_device`` and a dtype the
    device converts (:func:`unit_frame`), as it is."""
    if not isinstance(frame, np.ndarray):
        raise OAVMInputError(f"a frame must be a numpy array (H, W, 3), got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        hint = " (drop the alpha channel: frame[..., :3])" if frame.ndim == 3 and frame.shape[2] == 4 else ""
        raise OAVMInputError(f"a frame must be RGB with shape (H, W, 3), got {frame.shape}{hint}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise OAVMInputError(f"the frame is empty ({frame.shape[0]}x{frame.shape[1]} pixels)")
    if on_device and frame.dtype in _DEVICE_FRAME_DTYPES:
        return np.ascontiguousarray(frame)   # scaled, clipped and checked on the GPU (unit_frame)
    return _to_unit_float(frame, "frame", clip=True)


def unit_frame(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A checked (H, W, 3) frame on the device -> (1, 3, H, W) float32 in [0, 1] (a channels-last view), and
    for float frames a 0-dim "all finite" flag that the caller reads with the results.

    The GPU path: numpy's conversion of a 4K float32 frame is 100 MB of work on one CPU core per pass, and a uint8
    frame uploads a quarter of the bytes. Same arithmetic as :func:`_to_unit_float`, which stays the CPU's path
    (numpy converts a 4K uint8 frame in half the time torch takes there: 33 vs 62 ms on this project's CPU)."""
    if raw.dtype == torch.uint8:
        x, finite = raw.float().div_(_SCALE[np.dtype(np.uint8)]), None
    else:
        x = raw.float()
        finite = torch.isfinite(x).all()
        x = x.clamp_(0.0, 1.0)
    return x.permute(2, 0, 1).unsqueeze(0), finite


def _mask_to_array(obj_id: str, mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """Validate an (H, W) mask for ``obj_id`` matching the frame size; return float32 in [0, 1]."""
    what = f"the mask of object {obj_id!r}"
    if not isinstance(mask, np.ndarray):
        raise OAVMInputError(f"{what} must be a numpy array (H, W), got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise OAVMInputError(f"{what} must be single-channel (H, W), got shape {mask.shape}; "
                             f"pass one channel, e.g. mask[..., 0]")
    if mask.shape != shape:
        raise OAVMInputError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but the frame is {shape[1]}x{shape[0]}; "
                             f"resize the mask to the frame size")
    m = _to_unit_float(mask, what, clip=False)
    if not (m > 0).any():
        raise OAVMInputError(f"{what} is empty (all zero); paint the object in the mask, or leave the object "
                             f"out of the prompts")
    return m


def _to_unit_float(a: np.ndarray, what: str, *, clip: bool) -> np.ndarray:
    """Integers are scaled by their range; floats must be finite (and, for masks, in [0, 1])."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype in _SCALE:
        return a.astype(np.float32) / np.float32(_SCALE[a.dtype])
    if a.dtype not in _FLOATS:
        raise OAVMInputError(f"{what} has unsupported dtype {a.dtype}; use uint8, uint16, float16 or float32"
                             + (" (or bool)" if not clip else ""))
    out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise OAVMInputError(_NOT_FINITE.format(what=what))
    if clip:
        return np.clip(out, 0.0, 1.0)
    if out.min() < -1e-3 or out.max() > 1.0 + 1e-3:
        raise OAVMInputError(f"{what} has values in [{out.min():g}, {out.max():g}]; masks must be in 0..1 "
                             f"(divide 0..255 masks by 255)")
    return np.clip(out, 0.0, 1.0)


OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def advance_outputs(model: OAVM, feats, queries, state: ObjectState, foreground: bool,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | list[torch.Tensor], ObjectState]:
    """``model.advance``, its outputs as ``dtype`` planes alpha, fgmask[, foreground RGB] (each (N, 1 or 3, H, W)).

    On a GPU they are packed into one contiguous (N, 2 or 5, H, W) tensor for a single copy to the host (each
    object's planes are then contiguous numpy views); on the CPU packing would be a full-size copy for nothing
    (at 4K 66 MB, about 5 % of a step), so the planes are returned as they are."""
    out, nxt = model.advance(feats, queries, state, foreground)
    planes = [p.to(dtype) for p in [out["alpha"], out["fgmask"]] + ([out["fgr"]] if foreground else [])]
    if planes[0].device.type == "cpu":
        return planes, nxt
    return torch.cat(planes, dim=1).contiguous(), nxt


def _check_obj_id(obj_id: Any) -> str:
    if not isinstance(obj_id, str) or not obj_id:
        raise OAVMInputError(f"object ids must be non-empty strings, got {obj_id!r}")
    return obj_id


# --------------------------------------------------------------------------------------------- sessions

class ClipSession:
    """One clip being matted: per-object memory, O(1) in clip length. Not thread-safe (one step at a time)."""

    def __init__(self, engine: Engine, *, downsample_ratio: float | None = None, foreground: bool = True,
                 output_dtype: str = "float32") -> None:
        if downsample_ratio is not None and not (isinstance(downsample_ratio, (int, float))
                                                 and 0.0 < downsample_ratio <= 1.0):
            raise OAVMInputError(f"downsample_ratio must be in (0, 1] or None for automatic, got {downsample_ratio!r}")
        if output_dtype not in OUTPUT_DTYPES:
            raise OAVMInputError(f"output_dtype is {output_dtype!r}; use one of {', '.join(OUTPUT_DTYPES)}")
        self.output_dtype = output_dtype
        self.engine = engine
        self.downsample_ratio = None if downsample_ratio is None else float(downsample_ratio)
        self.foreground = bool(foreground)   # compute the foreground colour too (may be changed between steps)
        self.frames_seen = 0
        self.frame_shape: tuple[int, int] | None = None
        self._objects: dict[str, ObjectState] = {}
        self._graph: GraphedStep | None = None     # Engine(cuda_graphs=True): the recorded steady-state step
        self._graph_key: tuple | None = None

    # -- public API --------------------------------------------------------------------------------------

    @property
    def object_ids(self) -> list[str]:
        return list(self._objects)

    def effective_downsample_ratio(self, height: int, width: int) -> float:
        """The ratio the network runs at for frames of this size (the given one, or the automatic one)."""
        return self.downsample_ratio if self.downsample_ratio is not None else auto_downsample_ratio(height, width)

    def step(self, frame: np.ndarray, prompts: Mapping[str, np.ndarray] | None = None) -> dict[str, Matte]:
        """Matte one frame for every object. ``prompts`` add new objects or re-prompt known ones at this frame."""
        image = _frame_to_array(frame, on_device=self.engine.frames_on_device)
        shape = image.shape[:2]
        if self.frame_shape is not None and shape != self.frame_shape:
            raise OAVMInputError(f"this clip's frames are {self.frame_shape[1]}x{self.frame_shape[0]} but this frame "
                                 f"is {shape[1]}x{shape[0]}; start a new session for another frame size")
        if prompts is not None and not isinstance(prompts, Mapping):
            raise OAVMInputError(f"prompts must be a mapping obj_id -> mask, got {type(prompts).__name__}")
        masks = {_check_obj_id(k): _mask_to_array(k, v, shape) for k, v in (prompts or {}).items()}
        if not self._objects and not masks:
            raise OAVMInputError("the first frame of a clip needs at least one prompt: pass "
                                 "prompts={obj_id: mask} with a mask of the object to matte")
        return self._run(image, masks)

    def add_object(self, obj_id: str, frame: np.ndarray, mask: np.ndarray) -> dict[str, Matte]:
        """Add a new object at this frame (error if the id is already used)."""
        if _check_obj_id(obj_id) in self._objects:
            raise OAVMInputError(f"object {obj_id!r} already exists in this clip; use reprompt() to correct it "
                                 f"or choose another id")
        return self.step(frame, {obj_id: mask})

    def reprompt(self, obj_id: str, frame: np.ndarray, mask: np.ndarray) -> dict[str, Matte]:
        """Replace a known object's long-term memory and carried mask with this frame and mask."""
        if _check_obj_id(obj_id) not in self._objects:
            raise OAVMInputError(f"unknown object {obj_id!r}; known objects: {self.object_ids}; use add_object()")
        return self.step(frame, {obj_id: mask})

    def remove_object(self, obj_id: str) -> None:
        if obj_id not in self._objects:
            raise OAVMInputError(f"unknown object {obj_id!r}; known objects: {self.object_ids}")
        del self._objects[obj_id]

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this session keeps between frames (for memory accounting)."""
        return [getattr(s, name) for s in self._objects.values() for name in _STATE_FIELDS]

    def memory_bytes(self) -> int:
        """Bytes of the tensors held between frames; constant in clip length (grows only with objects)."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the clip: CPU tensors and plain values (``torch.load(weights_only=True)``)."""
        return {
            "format": SESSION_FORMAT, "version": SESSION_VERSION,
            "config": self.engine.model.config.to_dict(), "precision": self.engine.precision,
            "downsample_ratio": self.downsample_ratio, "frames_seen": self.frames_seen,
            "frame_shape": None if self.frame_shape is None else list(self.frame_shape),
            "objects": [[obj_id, {name: getattr(s, name).detach().cpu().clone() for name in _STATE_FIELDS}]
                        for obj_id, s in self._objects.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; continues bit-identically on the same device and precision."""
        if not isinstance(state, Mapping) or state.get("format") != SESSION_FORMAT:
            raise OAVMInputError("this is not an OAVM clip-session state (see ClipSession.state_dict())")
        if state.get("version") != SESSION_VERSION:
            raise OAVMInputError(f"clip-session state version {state.get('version')!r} is not supported "
                                 f"(this OAVM writes version {SESSION_VERSION}); re-open the clip from a keyframe")
        if state.get("config") != self.engine.model.config.to_dict():
            raise OAVMInputError("this clip state was made with a model of another configuration; load it with the "
                                 "same checkpoint, or re-open the clip from a keyframe")
        ratio = state.get("downsample_ratio")
        shape = state.get("frame_shape")
        objects: dict[str, ObjectState] = {}
        try:
            for obj_id, tensors in state["objects"]:
                objects[_check_obj_id(obj_id)] = ObjectState(
                    **{name: tensors[name].to(self.engine.device) for name in _STATE_FIELDS})
            frames_seen = int(state["frames_seen"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OAVMInputError(f"the clip-session state is incomplete or damaged ({exc!r}); "
                                 f"re-open the clip from a keyframe") from None
        self.downsample_ratio = None if ratio is None else float(ratio)
        self.frame_shape = None if shape is None else (int(shape[0]), int(shape[1]))
        self.frames_seen = frames_seen
        self._objects = objects

    # -- internals ---------------------------------------------------------------------------------------

    def _run(self, image: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, Matte]:
        engine, model = self.engine, self.engine.model
        h, w = image.shape[:2]
        ratio = self.effective_downsample_ratio(h, w)
        with torch.inference_mode(), engine.autocast():
            raw = self._to_device(image)
            if masks or not engine.cuda_graphs:
                if engine.frames_on_device:
                    x, finite = unit_frame(raw)
                else:                            # already float32 in [0, 1] and checked by _frame_to_array
                    x, finite = raw.permute(2, 0, 1).unsqueeze(0), None
                feats = model.encode_frame(x, ratio)
                queries = model.generate_queries(feats)
                objects = dict(self._objects)
                if masks:
                    batch = torch.stack([self._to_device(m) for m in masks.values()]).unsqueeze(1)
                    for obj_id, s in zip(masks, model.prompt(feats, batch).split()):
                        objects[obj_id] = s
                ids = list(objects)
                outputs, nxt = advance_outputs(model, feats, queries, ObjectState.cat([objects[i] for i in ids]),
                                               self.foreground, OUTPUT_DTYPES[self.output_dtype])
            else:   # steady state on the GPU: the whole step replayed as one CUDA graph
                ids = list(self._objects)
                outputs, nxt, finite = self._graphed(raw, ratio, ids)(
                    raw, ObjectState.cat([self._objects[i] for i in ids]))
            alpha, fgmask, fgr = self._to_host(outputs)   # one copy back (and the one wait for the device)
            if finite is not None and not bool(finite):
                raise OAVMInputError(_NOT_FINITE.format(what="the frame"))
            self._objects = {i: ObjectState(**{k: t.clone() for k, t in s.tensors().items()})
                             for i, s in zip(ids, nxt.split())}
        self.frames_seen += 1
        self.frame_shape = (h, w)
        return {obj_id: Matte(alpha=alpha[i], fgmask=fgmask[i],
                              foreground=None if fgr is None else np.ascontiguousarray(fgr[i].transpose(1, 2, 0)))
                for i, obj_id in enumerate(ids)}

    def _graphed(self, raw: torch.Tensor, ratio: float, ids: list[str]) -> "GraphedStep":
        """This clip's recorded step, recorded again when what it was recorded for changed."""
        key = (tuple(raw.shape), raw.dtype, ratio, tuple(ids), self.foreground, self.output_dtype)
        if self._graph is None or self._graph_key != key:
            self._graph = None   # free the old graph's memory pool before recording the new one
            model, foreground, dtype = self.engine.model, self.foreground, OUTPUT_DTYPES[self.output_dtype]

            def step(frame: torch.Tensor, state: ObjectState):
                x, finite = unit_frame(frame)
                feats = model.encode_frame(x, ratio)
                packed, nxt = advance_outputs(model, feats, model.generate_queries(feats), state, foreground, dtype)
                return packed, nxt, finite

            state = ObjectState.cat([self._objects[i] for i in ids])
            self._graph, self._graph_key = GraphedStep(step, raw, state, autocast=self.engine.autocast), key
        return self._graph

    def _to_host(self, outputs: torch.Tensor | list[torch.Tensor]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(alpha (N, H, W), fgmask (N, H, W), foreground (N, 3, H, W) or None) as numpy. The CPU's planes are
        viewed as they are. A GPU's packed planes come back through page-locked memory: torch's host allocator
        recycles the block once the caller drops the arrays, and DMA into it is several times faster than into
        pageable memory (a 4K frame's two planes are 66 MB; docs/performance.md)."""
        if isinstance(outputs, list):
            arrays = [p.numpy() for p in outputs]
            return arrays[0][:, 0], arrays[1][:, 0], arrays[2] if len(arrays) > 2 else None
        if self.engine.pinned_transfers:
            packed = torch.empty(outputs.shape, dtype=outputs.dtype, pin_memory=True)
            packed.copy_(outputs)
        else:
            packed = outputs.cpu()
        packed = packed.numpy()
        return packed[:, 0], packed[:, 1], packed[:, 2:5] if packed.shape[1] > 2 else None

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """The array on the engine's device. A service's frames are read-only views (of a message or of the client's
        shared memory), which torch.from_numpy warns about once per process, in the service's log; the tensor is
        only read (copied to the device), so the warning says nothing here."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.engine.device, non_blocking=True)
