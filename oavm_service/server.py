# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm serve``: the local OAVM service; ``oavm keygen``: CURVE keys for a service beyond loopback.

One ROUTER socket, one engine (one model on one device), many clips: each clip id owns an engine ClipSession and
the frame index it expects next. Requests are served one at a time in arrival order (the device runs one frame at
a time anyway); sends never block, so a client that stopped reading or vanished costs the others nothing.

Clips beyond ``--max-clips`` are evicted least-recently-used first: their state goes to the state directory and is
restored, transparently, by their next request. SIGINT/SIGTERM finish the request in flight, answer whatever is
still queued with ``busy``, save every clip to the state directory and exit 0; a service started again on the same
state directory continues those clips.

A client on the same machine may put a request's pixels in shared memory (shared/shared_memory.py) instead of the
message. The service maps such segments read-only, only its own user's and only while it listens on loopback;
``--no-shared-memory`` turns it off.

The wire format is shared/protocol.py (docs/protocol.md lists the ops).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import signal
import stat
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zmq

from oavm_service.errors import CheckpointError, OAVMInputError
from oavm_service.heap import release_freed_memory
from shared.protocol import (DEFAULT_ENDPOINT, MAX_HEADER_BYTES, MAX_IN_FLIGHT, PROTOCOL_VERSION, REPLY_DTYPES,
                             ErrorCode, Limits, Message, OAVMServiceError, Op, ProtocolError, decode_message,
                             encode_message, error_header, is_loopback, layer_buffers, reply_header, to_rgb)
from shared.shared_memory import SegmentMap, default_dir, largest_slot, segment_bytes

if TYPE_CHECKING:  # the engine pulls in torch; `oavm serve --help` and `oavm keygen` should not wait for it
    from oavm_service.engine import ClipSession, Engine, Matte

log = logging.getLogger("oavm.service")

STATE_FORMAT = 1
STATE_SUFFIX = ".oavmclip"
POLL_MS = 200             # how often the loop looks at the stop flag while idle
MAX_DRAIN_ON_STOP = 1000  # queued requests answered with "busy" on shutdown
REPLY_CACHE_BYTES = 512 << 20   # last replies kept for clients' resends (4K mattes are ~66 MB per object)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.environ.get("LOCALAPPDATA") or Path.home() / ".local" / "state"
    return Path(base) / "oavm" / "clips"


@dataclass
class ServeConfig:
    """The ``oavm serve`` options."""
    endpoint: str = DEFAULT_ENDPOINT
    checkpoint: str | None = None          # None: the shipped default checkpoint
    device: str = "auto"
    precision: str = "auto"
    cuda_graphs: bool = True               # on a GPU: replay each clip's steady-state step as a CUDA graph
    max_clips: int = 8
    max_frame_pixels: int = 40_000_000
    max_message_mb: int = 1024
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "info"
    allow_remote: bool = False
    curve_dir: Path | None = None
    shared_memory: bool = True             # map local clients' shared-memory segments (loopback, Linux only)

    @property
    def limits(self) -> Limits:
        return Limits(max_frame_pixels=self.max_frame_pixels, max_message_bytes=self.max_message_mb << 20)


# ------------------------------------------------------------------------------------------------ endpoints
def check_exposure(config: ServeConfig) -> None:
    """Refuse to listen beyond loopback unless asked to with --allow-remote and CURVE keys (an open port would let
    anyone on the network send frames, read files through matte_file and fill the disk)."""
    if is_loopback(config.endpoint):
        return
    if not config.allow_remote:
        raise SystemExit(f"oavm serve: refusing to listen on {config.endpoint}, which other machines can reach. "
                         f"Listen on tcp://127.0.0.1:PORT, or pass --allow-remote together with --curve-dir DIR "
                         f"(make the keys with `oavm keygen DIR`).")
    if config.curve_dir is None:
        raise SystemExit("oavm serve: --allow-remote needs CURVE keys so that only your clients get in: run "
                         "`oavm keygen DIR` and pass --curve-dir DIR.")


# ------------------------------------------------------------------------------------------------ clips
@dataclass
class Clip:
    """One clip held by the service: its engine session and where it is in the shot."""
    clip_id: str
    session: "ClipSession"
    direction: int                 # +1 forward, -1 backward from the keyframe
    next_frame: int                # the only frame index the next frame request may carry
    want_foreground: bool
    reply_dtype: str = "float32"        # of the matte buffers (protocol.REPLY_DTYPES)
    # the last MAX_IN_FLIGHT successes, (id, op, frame) -> reply: a client's resend of one of them is answered
    # again instead of advancing the clip twice (a streaming client may resend two)
    replies: OrderedDict = field(default_factory=OrderedDict)

    def summary(self) -> dict[str, Any]:
        return {"clip_id": self.clip_id, "objects": list(self.session.object_ids), "next_frame": self.next_frame,
                "direction": self.direction, "frames_seen": self.session.frames_seen,
                "memory_bytes": self.session.memory_bytes(), "reply_dtype": self.reply_dtype}


class ClipStore:
    """The clips in memory (least recently used first) and their saved states in the state directory."""

    def __init__(self, engine: "Engine", state_dir: Path, max_clips: int):
        self.engine = engine
        self.state_dir = Path(state_dir)
        self.max_clips = max_clips
        self.clips: OrderedDict[str, Clip] = OrderedDict()
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def peek(self, clip_id: str) -> Clip | None:
        """The clip if it is in memory, without touching its LRU position or the disk."""
        return self.clips.get(clip_id)

    def exists(self, clip_id: str) -> bool:
        return clip_id in self.clips or self.state_path(clip_id).exists()

    def get(self, clip_id: str) -> Clip:
        """The clip, restored from the state directory if it was evicted (or saved at the last shutdown)."""
        clip = self.clips.get(clip_id)
        if clip is not None:
            self.clips.move_to_end(clip_id)
            return clip
        path = self.state_path(clip_id)
        if not path.exists():
            raise OAVMServiceError(ErrorCode.UNKNOWN_CLIP, f"no clip {clip_id!r} is open; start it with open_clip "
                                                           f"(a keyframe and a mask per object) or load_clip")
        clip = self.load(clip_id, path)
        log.info("restored clip %r from %s", clip_id, path)
        self.put(clip)
        return clip

    def put(self, clip: Clip) -> None:
        """Hold ``clip`` (replacing one of the same id); evict the least recently used beyond max_clips."""
        self.clips[clip.clip_id] = clip
        self.clips.move_to_end(clip.clip_id)
        while len(self.clips) > self.max_clips:
            old_id, old = self.clips.popitem(last=False)
            path = self.save(old, self.state_path(old_id))
            log.info("evicted clip %r (LRU, --max-clips %d) to %s", old_id, self.max_clips, path)

    def remove(self, clip_id: str) -> bool:
        """Forget the clip, in memory and in the state directory."""
        held = self.clips.pop(clip_id, None) is not None
        path = self.state_path(clip_id)
        saved = path.exists()
        path.unlink(missing_ok=True)
        if held:   # the heap keeps the steps' freed buffers for the next step (heap.py): give them back now
            release_freed_memory()
        return held or saved

    def save_all(self) -> int:
        for clip in self.clips.values():
            self.save(clip, self.state_path(clip.clip_id))
        return len(self.clips)

    def state_path(self, clip_id: str) -> Path:
        """A file name that is safe for any clip id and unique to it."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id)[:60]
        digest = hashlib.sha256(clip_id.encode()).hexdigest()[:12]
        return self.state_dir / f"{slug}-{digest}{STATE_SUFFIX}"

    def save(self, clip: Clip, path: Path) -> Path:
        """Write the clip's state atomically (a farm node killed mid-save leaves the previous file intact)."""
        import torch

        state = {"format": STATE_FORMAT, "clip_id": clip.clip_id, "direction": clip.direction,
                 "next_frame": clip.next_frame, "want_foreground": clip.want_foreground,
                 "reply_dtype": clip.reply_dtype,
                 "checkpoint_sha256": str(self.engine.checkpoint_info.get("sha256", "")),
                 "session": clip.session.state_dict()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, clip_id: str, path: Path) -> Clip:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
            raise OAVMServiceError(ErrorCode.BAD_INPUT, f"the saved clip state {path} cannot be read ({exc}); open "
                                                        f"the clip again with open_clip at a keyframe") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OAVMServiceError(ErrorCode.BAD_INPUT, f"{path} is not an OAVM clip state of format {STATE_FORMAT}; "
                                                        f"open the clip again with open_clip at a keyframe")
        ours = str(self.engine.checkpoint_info.get("sha256", ""))
        if state["checkpoint_sha256"] != ours:
            raise OAVMServiceError(ErrorCode.BAD_INPUT,
                                   f"{path} was saved by a service running another checkpoint (sha256 "
                                   f"{state['checkpoint_sha256'][:12]}, this one {ours[:12]}); continue it with that "
                                   f"checkpoint or open the clip again with open_clip")
        reply_dtype = str(state.get("reply_dtype", "float32"))     # states saved before float16 replies
        session = self.engine.new_session(foreground=bool(state["want_foreground"]), output_dtype=reply_dtype)
        session.load_state_dict(state["session"])     # also restores the clip's downsample_ratio
        return Clip(clip_id, session, int(state["direction"]), int(state["next_frame"]),
                    bool(state["want_foreground"]), reply_dtype)


# ------------------------------------------------------------------------------------------------ requests
class Service:
    """Turns one request message into one reply message; never raises (every failure becomes an error reply)."""

    def __init__(self, engine: "Engine", config: ServeConfig):
        self.engine = engine
        self.config = config
        self.limits = config.limits
        self.loopback = is_loopback(config.endpoint)
        self.store = ClipStore(engine, config.state_dir, config.max_clips)
        shm_dir = default_dir() if config.shared_memory and self.loopback else None
        # a client's segment holds the pixels of MAX_IN_FLIGHT requests of at most one message's bytes each
        largest = segment_bytes(largest_slot(self.limits.max_message_bytes, self.limits.max_buffers), MAX_IN_FLIGHT)
        self.segments = SegmentMap(shm_dir, max_segment_bytes=largest) if shm_dir else None
        self.started = time.time()
        self.handlers: dict[str, Callable[[Message], tuple[dict, list]]] = {
            Op.STATUS: self._status, Op.OPEN_CLIP: self._open_clip, Op.MATTE: self._matte,
            Op.MATTE_FILE: self._matte_file, Op.ADD_OBJECT: self._add_object, Op.REPROMPT: self._reprompt,
            Op.PROMPT: self._prompt_objects,
            Op.DROP_OBJECT: self._drop_object, Op.SAVE_CLIP: self._save_clip, Op.LOAD_CLIP: self._load_clip,
            Op.CLOSE_CLIP: self._close_clip}

    def handle(self, parts: list) -> tuple[list, Message | None, str]:
        """(reply parts, the request (only its header if it did not decode; None if not even that), "ok" or the
        error code) for one request."""
        try:
            msg = decode_message(parts, self.limits, shared_memory=self.segments.memory if self.segments else None)
        except ProtocolError as exc:
            readable = Message(exc.header) if exc.header.get("op") in Op.ALL else None   # for the log line
            return encode_message(error_header(exc.header, exc.code, exc.message)), readable, exc.code
        clip = self.store.peek(msg.clip) if msg.clip else None
        key = _request_key(msg)
        if clip is not None and key in clip.replies:
            return clip.replies[key], msg, "ok (resent)"          # the client retried a request we answered
        try:
            header, buffers = self.handlers[msg.op](msg)
            reply = encode_message(header, buffers)
        except OAVMServiceError as exc:
            return encode_message(error_header(msg.header, exc.code, exc.message)), msg, exc.code
        except OAVMInputError as exc:
            return encode_message(error_header(msg.header, ErrorCode.BAD_INPUT, str(exc))), msg, ErrorCode.BAD_INPUT
        except Exception as exc:  # a bug or a device failure must not stop the service for everyone
            log.exception("op %s on clip %r failed", msg.op, msg.clip)
            return encode_message(error_header(msg.header, ErrorCode.INTERNAL, _internal_message(exc))), msg, \
                ErrorCode.INTERNAL
        held = self.store.peek(msg.clip) if msg.clip else None
        if held is not None:
            held.replies[key] = reply
            while len(held.replies) > MAX_IN_FLIGHT:
                held.replies.popitem(last=False)
            self._trim_reply_cache()
        return reply, msg, "ok"

    def _trim_reply_cache(self) -> None:
        """Keep the cached replies within REPLY_CACHE_BYTES (the newest always), dropping those of the least
        recently used clips first."""
        total = 0
        for clip in reversed(self.store.clips.values()):      # most recently used first
            size = sum(_nbytes(reply) for reply in clip.replies.values())
            if total and total + size > REPLY_CACHE_BYTES:
                clip.replies.clear()
            else:
                total += size

    # -------------------------------------------------------------------------------------------- ops
    def _status(self, msg: Message) -> tuple[dict, list]:
        info = self.engine.checkpoint_info
        clips = [c.summary() for c in self.store.clips.values()]
        result = {
            "protocol": PROTOCOL_VERSION, "service_version": _version(), "pid": os.getpid(),
            "device": str(self.engine.device), "precision": self.engine.precision,
            "cuda_graphs": self.engine.cuda_graphs,
            "checkpoint": {k: _plain(info.get(k)) for k in ("path", "sha256", "version")},
            "clips": clips, "clips_held": len(clips),
            "clips_saved": len(list(self.store.state_dir.glob("*" + STATE_SUFFIX))),
            "memory_bytes": sum(c["memory_bytes"] for c in clips), "device_memory_bytes": self._device_memory(),
            "limits": {"max_clips": self.config.max_clips, "max_frame_pixels": self.limits.max_frame_pixels,
                       "max_message_bytes": self.limits.max_message_bytes},
            "loopback": self.loopback, "matte_file": self.loopback, "uptime_s": round(time.time() - self.started, 1),
            "shared_memory": self._shared_memory(msg.args.get("shm_probe")),
            "ops": list(self.handlers),          # what this service can do: a newer client checks before relying on it
        }
        return reply_header(msg.header, result=result), []

    def _shared_memory(self, probe: Any) -> dict[str, Any]:
        """Whether this service maps clients' segments, how many it holds, and, for a client's ``shm_probe``
        ({path, size, token}), "ok" if it can use that segment or why not."""
        info: dict[str, Any] = {"enabled": self.segments is not None,
                                "segments": len(self.segments) if self.segments else 0}
        if probe is not None:
            if self.segments is None:
                info["probe"] = ("this service takes no shared memory (" + (
                    "started with --no-shared-memory" if not self.config.shared_memory else
                    "it listens beyond loopback" if not self.loopback else "no /dev/shm on this system") + ")")
            else:
                info["probe"] = self.segments.probe(probe)
        return info

    def _device_memory(self) -> int | None:
        """Bytes the engine's GPU holds (model, clips, caches); None on the CPU."""
        import torch

        return torch.cuda.memory_allocated(self.engine.device) if self.engine.device.type == "cuda" else None

    def _open_clip(self, msg: Message) -> tuple[dict, list]:
        clip_id, frame_index = _clip_id(msg), _frame_index(msg)
        direction = _arg(msg, "direction", int, 1)
        if direction not in (1, -1):
            raise _bad_request(f"direction is {direction}; use +1 (forward) or -1 (backward from the keyframe)")
        ratio = _arg(msg, "downsample_ratio", (int, float), None)    # its range is the engine's to check
        if self.store.exists(clip_id) and not _arg(msg, "restart", bool, False):
            raise _bad_request(f"clip {clip_id!r} is already open; send open_clip with restart=true to start it "
                               f"again at frame {frame_index}, or close_clip it first")
        frame, masks = self._frame(msg), self._masks(msg)
        want_foreground = _arg(msg, "want_foreground", bool, False)
        reply_dtype = _arg(msg, "reply_dtype", str, "float32")
        if reply_dtype not in REPLY_DTYPES:
            raise _bad_request(f"reply_dtype is {reply_dtype!r}; use one of {', '.join(REPLY_DTYPES)}")
        session = self.engine.new_session(downsample_ratio=ratio, foreground=want_foreground, output_dtype=reply_dtype)
        mattes = session.step(frame, masks)
        clip = Clip(clip_id, session, direction, frame_index + direction, want_foreground, reply_dtype)
        self.store.remove(clip_id)       # a restart also forgets the old saved state
        self.store.put(clip)
        return self._matte_reply(msg, clip, mattes)

    def _matte(self, msg: Message) -> tuple[dict, list]:
        clip = self._clip_in_order(msg)
        return self._advance(msg, clip, clip.session.step(self._frame(msg)))

    def _matte_file(self, msg: Message) -> tuple[dict, list]:
        if not self.loopback:
            raise _bad_request("matte_file is refused by a service that listens beyond loopback (it would read "
                               "files for remote clients); send the pixels with matte instead")
        clip = self._clip_in_order(msg)
        frame = self._read_frame_file(_arg(msg, "path", str, None), _arg(msg, "colorspace", str, "auto"))
        return self._advance(msg, clip, clip.session.step(frame))

    def _add_object(self, msg: Message) -> tuple[dict, list]:
        clip = self._clip_in_order(msg)
        obj_id, mask = self._prompt(msg)
        return self._advance(msg, clip, clip.session.add_object(obj_id, self._frame(msg), mask))

    def _reprompt(self, msg: Message) -> tuple[dict, list]:
        clip = self._clip_in_order(msg)
        obj_id, mask = self._prompt(msg)
        return self._advance(msg, clip, clip.session.reprompt(obj_id, self._frame(msg), mask))

    def _prompt_objects(self, msg: Message) -> tuple[dict, list]:
        clip = self._clip_in_order(msg)
        masks = self._masks(msg)
        if not masks:
            raise _bad_request("op prompt needs one 'mask' buffer per object (its 'object' = the object id)")
        return self._advance(msg, clip, clip.session.step(self._frame(msg), masks))

    def _drop_object(self, msg: Message) -> tuple[dict, list]:
        clip = self.store.get(_clip_id(msg))
        clip.session.remove_object(_arg(msg, "object", str, None))
        return reply_header(msg.header, result={"objects": list(clip.session.object_ids)}), []

    def _save_clip(self, msg: Message) -> tuple[dict, list]:
        clip = self.store.get(_clip_id(msg))
        raw = _arg(msg, "path", str, None)
        path = self.store.state_path(clip.clip_id) if raw is None else self._state_file(raw)
        self.store.save(clip, path)
        return reply_header(msg.header, result={"path": str(path), **clip.summary()}), []

    def _load_clip(self, msg: Message) -> tuple[dict, list]:
        clip_id = _clip_id(msg)
        path = self._state_file(_arg(msg, "path", str, None, required=True))
        if not path.is_file():
            raise OAVMServiceError(ErrorCode.BAD_INPUT, f"there is no saved clip state at {path}; give the path that "
                                                        f"save_clip returned")
        clip = self.store.load(clip_id, path)
        self.store.put(clip)
        return reply_header(msg.header, result={"path": str(path), **clip.summary()}), []

    def _close_clip(self, msg: Message) -> tuple[dict, list]:
        return reply_header(msg.header, result={"closed": self.store.remove(_clip_id(msg))}), []

    # -------------------------------------------------------------------------------------------- pieces
    def _clip_in_order(self, msg: Message) -> Clip:
        """The request's clip, if the request carries the frame index the clip expects next."""
        clip, frame_index = self.store.get(_clip_id(msg)), _frame_index(msg)
        if frame_index != clip.next_frame:
            way = "forward" if clip.direction > 0 else "backward"
            raise OAVMServiceError(
                ErrorCode.OUT_OF_ORDER,
                f"clip {clip.clip_id!r} expects frame {clip.next_frame} next (it runs {way}; the last frame was "
                f"{clip.next_frame - clip.direction}), not frame {frame_index}; send frame {clip.next_frame}, or "
                f"open_clip at frame {frame_index} with restart=true and a mask to start again there")
        return clip

    def _advance(self, msg: Message, clip: Clip, mattes: dict[str, "Matte"]) -> tuple[dict, list]:
        clip.next_frame += clip.direction
        return self._matte_reply(msg, clip, mattes)

    def _matte_reply(self, msg: Message, clip: Clip, mattes: dict[str, "Matte"]) -> tuple[dict, list]:
        layers = {}
        for obj_id, m in mattes.items():
            layers[obj_id] = {"alpha": m.alpha, "fgmask": m.fgmask}
            if clip.want_foreground:   # premultiplied, as compositors merge it
                layers[obj_id]["fg"] = np.multiply(m.foreground, m.alpha[..., None], dtype=m.alpha.dtype)
        result = {"next_frame": clip.next_frame, "objects": list(clip.session.object_ids)}
        return reply_header(msg.header, result=result), layer_buffers(layers)

    def _frame(self, msg: Message) -> np.ndarray:
        buf = msg.buffer("frame")
        if buf is None:
            raise _bad_request(f"op {msg.op} needs a 'frame' buffer (the pixels, (H, W, C))")
        return to_rgb(buf.array, buf.channels)

    def _masks(self, msg: Message) -> dict[str, np.ndarray]:
        return {obj: buf.array for obj, buf in msg.per_object("mask").items()}   # the engine checks them

    def _prompt(self, msg: Message) -> tuple[str, np.ndarray]:
        obj_id = _arg(msg, "object", str, None, required=True)
        buf = msg.per_object("mask").get(obj_id)
        if buf is None:
            raise _bad_request(f"op {msg.op} needs a 'mask' buffer for object {obj_id!r}")
        return obj_id, buf.array

    def _read_frame_file(self, path: str | None, colorspace: str) -> np.ndarray:
        from oavm_service.io.colour import InputColorspace
        from oavm_service.io.images import read_header, read_image
        from oavm_service.io.movies import is_movie

        if not path or not os.path.isabs(path):
            raise _bad_request(f"matte_file needs an absolute 'path' to a still image, not {path!r}")
        if is_movie(path):
            raise OAVMServiceError(ErrorCode.BAD_INPUT, f"{path} is a movie; matte_file reads still images (EXR, "
                                                        f"DPX, TIFF, PNG, JPEG): decode the frame and send it with "
                                                        f"matte")
        header = read_header(path)   # checked before the pixels are read
        height, width = header.data_window.shape
        if height * width > self.limits.max_frame_pixels:
            raise OAVMServiceError(ErrorCode.TOO_LARGE, f"{path} is {width}x{height} pixels; this service accepts "
                                                        f"at most {self.limits.max_frame_pixels} per frame")
        return read_image(path).network_rgb(InputColorspace.parse(colorspace))

    def _state_file(self, raw: str) -> Path:
        """A client-named state file: absolute; beyond loopback only inside the state directory."""
        path = Path(raw)
        if not path.is_absolute():
            raise _bad_request(f"the state file path {raw!r} must be absolute (it is a path on the service's machine)")
        if not self.loopback and self.store.state_dir.resolve() not in path.resolve().parents:
            raise _bad_request(f"this service listens beyond loopback and keeps clip states only in its state "
                               f"directory {self.store.state_dir}; give a path inside it or none")
        return path


def _nbytes(parts: list) -> int:
    return sum(getattr(part, "nbytes", None) or len(part) for part in parts)


def _request_key(msg: Message) -> tuple:
    """What makes a request a resend of another: same id, op and frame (a client that reuses ids gets no stale
    answer for its next frame)."""
    return msg.request_id, msg.op, msg.frame


def _clip_id(msg: Message) -> str:
    if not msg.clip:
        raise _bad_request(f"op {msg.op} needs a 'clip' id in the header")
    return msg.clip


def _frame_index(msg: Message) -> int:
    if msg.frame is None:
        raise _bad_request(f"op {msg.op} needs a 'frame' index in the header")
    return msg.frame


def _arg(msg: Message, name: str, kind: type | tuple[type, ...], default: Any, *, required: bool = False) -> Any:
    """One op argument, checked for its type (bool is not an int here)."""
    value = msg.args.get(name)
    if value is None:
        if required:
            raise _bad_request(f"op {msg.op} needs the argument {name!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad_request(f"argument {name!r} of op {msg.op} must be {names}, not {value!r}")
    return value


def _bad_request(message: str) -> OAVMServiceError:
    return OAVMServiceError(ErrorCode.BAD_REQUEST, message)


def _internal_message(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in str(exc).lower():
        return (f"the device ran out of memory ({text}); close clips you no longer need, use a smaller "
                f"downsample_ratio, or start the service with a smaller --max-clips")
    return f"the service failed on this request ({text}); the service log has the traceback: please report it"


def _plain(value: Any) -> Any:
    """A msgpack-safe copy of ``value`` (paths and other objects become strings)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _version() -> str:
    from oavm_service import __version__
    return __version__


# ------------------------------------------------------------------------------------------------ the socket
class Server:
    """The ROUTER socket and its loop around a Service."""

    def __init__(self, service: Service, config: ServeConfig):
        self.service = service
        self.config = config
        self.stopping = False
        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.router_mandatory = 1          # a reply to a vanished client raises instead of vanishing
        self.sock.sndhwm = 64                   # replies queued per client before we drop (never block) ...
        self.sock.rcvhwm = 64                   # ... and requests queued per client before zmq pushes back
        # per part, and fatal to the connection (no reply): twice the limit, so that a request somewhat over the
        # limit still gets a clear too_large reply from decode_message
        self.sock.maxmsgsize = 2 * service.limits.max_message_bytes + MAX_HEADER_BYTES
        self.sock.linger = 1000
        if config.curve_dir is not None:
            self._enable_curve(Path(config.curve_dir))
        try:
            self.sock.bind(config.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise SystemExit(f"oavm serve: cannot listen on {config.endpoint} ({exc}); if another OAVM service runs "
                             f"there, use it, or pass --endpoint tcp://127.0.0.1:OTHER_PORT") from None

    def _enable_curve(self, folder: Path) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        secret_file, clients = folder / "server.key_secret", folder / "clients"
        if not secret_file.is_file() or not list(clients.glob("*.key")):
            self.close()
            raise SystemExit(f"oavm serve: {folder} lacks server.key_secret or clients/*.key; make them with "
                             f"`oavm keygen {folder}`")
        public, secret = zmq.auth.load_certificate(secret_file)
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(clients))
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.curve_server = True

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        log.info("%s received: finishing the request in flight, then saving clip states",
                 signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopping:
            if poller.poll(POLL_MS):
                self._serve_one()
        self._answer_queued_busy()
        saved = self.service.store.save_all()
        log.info("saved %d clip state(s) to %s; stopped", saved, self.service.store.state_dir)
        self.close()
        return 0

    def _serve_one(self) -> None:
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        envelope, body = _split_envelope(parts)
        started = time.perf_counter()
        reply, msg, outcome = self.service.handle(body)
        ms = (time.perf_counter() - started) * 1000
        dropped = self._send(envelope, reply)
        client = envelope[0].hex()
        if msg is None:
            log.info("malformed request -> %s (%.1f ms, client %s%s)", outcome, ms, client, dropped)
        else:
            where = "".join(f" {k}={v}" for k, v in (("clip", msg.clip), ("frame", msg.frame)) if v is not None)
            log.info("%s%s -> %s (%.1f ms, client %s%s)", msg.op, where, outcome, ms, client, dropped)

    def _send(self, envelope: list[bytes], reply: list) -> str:
        """Send without ever blocking; "" when sent, else why the reply was dropped (for the log line)."""
        try:
            self.sock.send_multipart([*envelope, *reply], zmq.NOBLOCK, copy=False)
            return ""
        except zmq.Again:
            return "; reply dropped: the client is not reading its replies"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "; reply dropped: the client went away"
            return f"; reply dropped: {exc}"

    def _answer_queued_busy(self) -> None:
        """Requests that arrived during shutdown get an answer now instead of a client-side timeout."""
        for answered in range(MAX_DRAIN_ON_STOP):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if answered:
                    log.info("answered %d queued request(s) with 'busy'", answered)
                return
            envelope, body = _split_envelope(parts)
            try:
                header = decode_message(body, self.service.limits).header
            except ProtocolError as exc:
                header = exc.header
            self._send(envelope, encode_message(error_header(
                header, ErrorCode.BUSY, "the OAVM service is shutting down; start it again (`oavm serve`) and "
                                        "resend: clips continue from their saved state")))

    def close(self) -> None:
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _split_envelope(parts: list) -> tuple[list[bytes], list]:
    """(routing envelope, request) - a DEALER sends none; a REQ socket adds an empty delimiter we must echo."""
    if len(parts) > 2 and len(parts[1]) == 0:
        return [parts[0].bytes, b""], parts[2:]
    return [parts[0].bytes], parts[1:]


# ------------------------------------------------------------------------------------------------ commands
def _serve_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="oavm serve", description="Run the local OAVM service that the Blender and Nuke "
                                "plug-ins and `oavm batch --connect` talk to (ZeroMQ).")
    p.add_argument("--endpoint", default=d.endpoint, help=f"where to listen (default {d.endpoint}; anything beyond "
                   "loopback needs --allow-remote and --curve-dir)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (.safetensors); default: the shipped one")
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on cuda, fp32 on cpu")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="GPU: run every step eagerly instead of replaying each clip's recorded steady-state step "
                        "as a CUDA graph (the default; docs/performance.md has the measurements)")
    p.add_argument("--max-clips", type=int, default=d.max_clips,
                   help=f"clips held in memory; beyond it the least recently used is saved to --state-dir "
                        f"(default {d.max_clips})")
    p.add_argument("--max-frame-pixels", type=int, default=d.max_frame_pixels,
                   help=f"largest frame accepted, width x height (default {d.max_frame_pixels})")
    p.add_argument("--max-message-mb", type=int, default=d.max_message_mb,
                   help=f"largest request accepted, MiB (default {d.max_message_mb})")
    p.add_argument("--state-dir", type=Path, default=d.state_dir,
                   help=f"where evicted and shut-down clips are saved (default {d.state_dir})")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"],
                   help="info logs one line per request")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow an endpoint other machines can reach (needs --curve-dir)")
    p.add_argument("--curve-dir", type=Path, default=None,
                   help="CURVE keys made by `oavm keygen DIR`: encrypt, and admit only clients in DIR/clients")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="take pixels only in the messages, never from local clients' shared memory (/dev/shm), "
                        "which is otherwise used on loopback (docs/protocol.md)")
    return p


def parse_serve_args(argv: list[str]) -> ServeConfig:
    args = _serve_parser().parse_args(argv)
    for name in ("max_clips", "max_frame_pixels", "max_message_mb"):
        if getattr(args, name) < 1:
            raise SystemExit(f"oavm serve: --{name.replace('_', '-')} must be at least 1")
    return ServeConfig(**vars(args))


def main_serve(argv: list[str] | None = None) -> int:
    config = parse_serve_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_exposure(config)

    from oavm_service.engine import Engine   # torch: only now that the options are known to be sane

    log.info("loading %s on %s", config.checkpoint or "the shipped checkpoint", config.device)
    try:
        engine = Engine.from_checkpoint(config.checkpoint, device=config.device, precision=config.precision,
                                        cuda_graphs=None if config.cuda_graphs else False)
    except (CheckpointError, OAVMInputError) as exc:
        raise SystemExit(f"oavm serve: {exc}") from None
    service = Service(engine, config)
    server = Server(service, config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.request_stop)
    info = engine.checkpoint_info
    print(f"OAVM service listening on {config.endpoint} (protocol {PROTOCOL_VERSION}; device {engine.device}, "
          f"{engine.precision}{', CUDA graphs' if engine.cuda_graphs else ''}; checkpoint {info.get('path')} "
          f"sha256 {str(info.get('sha256', ''))[:12]}; "
          f"{'CURVE' if config.curve_dir else 'no encryption, loopback only'}; "
          f"{'shared memory for local clients' if service.segments else 'pixels in the messages only'}; "
          f"max {config.max_clips} clips; "
          f"state dir {config.state_dir})", flush=True)
    return server.run()


def main_keygen(argv: list[str] | None = None) -> int:
    """Make the CURVE keys: DIR/server.key(_secret) and DIR/clients/NAME.key(_secret); secrets readable by the
    owner only. An existing server key is kept, so adding a client does not lock out the others."""
    import zmq.auth

    p = argparse.ArgumentParser(prog="oavm keygen", description="Make CURVE keys for an OAVM service that listens "
                                "beyond loopback (`oavm serve --allow-remote --curve-dir DIR`).")
    p.add_argument("dir", type=Path, help="folder for the keys (created)")
    p.add_argument("--client", default="client", help="name of the client key pair to add (default: client)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.client):
        raise SystemExit("oavm keygen: --client must be letters, digits, '-' or '_'")
    clients = args.dir / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    os.chmod(args.dir, stat.S_IRWXU)
    if not (args.dir / "server.key_secret").exists():
        zmq.auth.create_certificates(args.dir, "server")
    if (clients / f"{args.client}.key").exists():
        raise SystemExit(f"oavm keygen: {clients / args.client}.key exists; pick another --client name")
    zmq.auth.create_certificates(clients, args.client)
    for secret in [args.dir / "server.key_secret", *clients.glob("*.key_secret")]:
        os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR)
    print(f"keys in {args.dir}:\n"
          f"  service: oavm serve --endpoint tcp://0.0.0.0:5590 --allow-remote --curve-dir {args.dir}\n"
          f"  client {args.client!r}: copy {args.dir / 'server.key'} and {clients / args.client}.key_secret to the "
          f"artist's machine (same layout) and give the plug-in that folder; never copy server.key_secret")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_serve(argv)
