# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm batch``: matte an image sequence or a movie headlessly, the way a render farm runs a job.

    oavm batch --input 'shot/plate.####.exr' --mask 1001=shot/mask.1001.png --frames 1001-1100 \\
               --output 'out/matte.####.exr'

How a shot is run (paper Sec. 3: one coarse mask is enough, memory carries the object through the clip):

* Keyframes are the frames that carry a mask (``--mask FRAME=PATH``, ``--object NAME=FRAME=PATH``). The clip runs
  forward from the first keyframe, re-prompting each object at its later keyframes, and backward from the first
  keyframe for frames of the range that lie before it. A chunk of a shot that starts after the first keyframe
  first runs the frames between (its "lead-in", nothing written) unless a saved state lets it skip them.
* Resumable: an output that is already complete (readable, right channels and windows, same checkpoint) is
  skipped; the clip state is saved every ``--state-every`` steps and at the end, so a killed job or the next chunk
  continues from the state instead of from the keyframe. Every file is written under a temporary name and renamed.
* Exit codes, for farm managers: 0 done, 1 bad input, 2 model/device error, 3 out of GPU memory, 4 service
  unavailable (``--connect``), 130 interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, TextIO

import numpy as np

from oavm_service import __version__
from oavm_service.errors import CheckpointError, OAVMError, OAVMInputError
from oavm_service.io import FrameSource, Plate
from oavm_service.io.colour import InputColorspace
from oavm_service.io.images import ImageHeader, Window, align_to_window, read_header, read_mask, verify_image, \
    write_image
from oavm_service.io.sequences import FramePattern, format_frame_range, parse_frame_range
from oavm_service.read_ahead import ReadAhead         # the next plate read while this frame is in the network
from shared.files import describe_removed, remove_left_temporaries
from shared.write_behind import WriteBehind, core_is_free   # the last matte written while the next frame is there

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_MODEL = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130

DEFAULT_OBJECT = "matte"            # the layer name of a single-object job (--mask)
STATE_FORMAT = 1
_OBJECT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_KEY_SPEC = re.compile(r"^(?:(?P<frame>-?\d+)=)?(?P<path>.+?)(?::(?P<index>\d+))?$")


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class KeyMask:
    """One object's mask at one keyframe; ``frame`` None means "the first frame of the shot"."""

    obj_id: str
    path: str
    frame: int | None = None
    index: int | None = None         # palette / id-image index (else --mask-index)


@dataclass
class BatchConfig:
    """Everything ``oavm batch`` was asked to do (the parsed command line; the demo builds one directly)."""

    input: str
    output: str
    masks: list[KeyMask]
    frames: list[int] | None = None            # None: every frame of the input
    first_frame: int = 0                       # number of a movie's first frame / a still's frame
    mask_channel: str | None = None
    mask_index: int | None = None
    colorspace: InputColorspace = InputColorspace.AUTO
    output_mode: str = "matte"                 # "matte" (layers A, fgmask) or "rgba"
    premultiply: bool = False
    checkpoint: str | None = None
    device: str = "auto"
    precision: str = "auto"
    cuda_graphs: bool = True                   # on a GPU: replay the steady-state step as a CUDA graph
    downsample_ratio: float | None = None
    state_every: int = 25                      # 0: no states
    state_dir: str | None = None
    overwrite: bool = False
    connect: str | None = None
    clip_id: str | None = None
    timeout_s: float = 120.0

    @property
    def objects(self) -> list[str]:
        return list(dict.fromkeys(k.obj_id for k in self.masks))


@dataclass
class Layer:
    """One object's result on one frame (from the engine or the service)."""

    alpha: np.ndarray
    fgmask: np.ndarray
    foreground: np.ndarray | None = None       # straight colour, in-process only


@dataclass
class Step:
    """One frame the clip steps through; ``write`` is False for lead-in frames outside the requested list."""

    frame: int
    prompts: dict[str, KeyMask]
    write: bool


@dataclass
class Pass:
    """One run of a clip session: forward from the first keyframe, or backward from it."""

    name: str                                  # "forward" or "backward"
    direction: int
    steps: list[Step]

    def history(self, upto: int) -> list[list]:
        """What a state after step ``upto`` has seen: frames and the masks given there (to match states).

        Plain lists, so that it compares equal to its own JSON round trip."""
        return [[s.frame, [[o, _mask_identity(k)] for o, k in sorted(s.prompts.items())]]
                for s in self.steps[:upto + 1]]


FrameCallback = Callable[[Plate, Mapping[str, Layer]], None]


# ------------------------------------------------------------------------------------------------ stepping


class Stepper(Protocol):
    """A clip being matted: in this process (EngineStepper) or in a running service (ServiceStepper)."""

    mode: str
    checkpoint_sha256: str
    signature: dict
    spare_cpu: bool       # whether a core is free for writing files while the network runs (write behind then)
    keys_together: bool   # whether several objects can be keyed on one frame after the first

    def start(self, direction: int, anchor: int) -> None: ...
    def step(self, position: int, rgb: np.ndarray, prompts: dict[str, np.ndarray], known: set[str]) \
        -> dict[str, Layer]: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> None: ...
    def close(self) -> None: ...


class EngineStepper:
    """The model in this process: ``ClipSession.step`` with all of a keyframe's prompts at once."""

    mode = "engine"

    def __init__(self, engine, downsample_ratio: float | None, foreground: bool = False) -> None:
        """``foreground``: also compute the foreground colour (the demo's composite); mattes alone are faster."""
        self.engine = engine
        self.downsample_ratio = downsample_ratio
        self.foreground = foreground
        self.session = None
        info = engine.checkpoint_info
        self.checkpoint_sha256 = str(info.get("sha256") or "")
        self.signature = {"device": str(engine.device), "precision": str(engine.precision)}
        self.spare_cpu = engine.device.type != "cpu" or _torch_threads() < (os.cpu_count() or 1)
        self.keys_together = True

    def start(self, direction: int, anchor: int) -> None:
        self.session = self.engine.new_session(downsample_ratio=self.downsample_ratio, foreground=self.foreground)

    def step(self, position, rgb, prompts, known):
        mattes = self.session.step(rgb, prompts or None)
        return {o: Layer(m.alpha, m.fgmask, m.foreground) for o, m in mattes.items()}

    def save(self, path: Path) -> None:
        import torch

        tmp = path.with_name(path.name + ".partial")
        torch.save({"format": STATE_FORMAT, "session": self.session.state_dict()}, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        self.session.load_state_dict(state["session"])

    def close(self) -> None:
        self.session = None


class ServiceStepper:
    """The same clip sent through ``shared.client.OAVMClient`` to a running ``oavm serve``.

    The service wants frame indices one apart in the clip's direction; they are counted from the anchor
    keyframe (``anchor + position * direction``), so stepped frame lists (``1-100x2``) work as well.
    """

    mode = "service"

    def __init__(self, endpoint: str, clip_id: str | None, downsample_ratio: float | None, timeout_s: float,
                 reply_dtype: str = "float32") -> None:
        """``reply_dtype`` "float16" where the output stores half floats anyway (EXR layers): half the bytes back,
        the same files (the service rounds as the EXR writer does; tested)."""
        from shared.client import OAVMClient

        self.client = OAVMClient(endpoint, timeout_s=timeout_s, retries=2, connect_timeout_s=min(timeout_s, 3.0))
        status = self.client.status()
        self.checkpoint_sha256 = str((status.get("checkpoint") or {}).get("sha256") or "")
        self.signature = {"device": str(status.get("device")), "precision": str(status.get("precision"))}
        self.spare_cpu = core_is_free(status, endpoint)
        self.keys_together = "prompt" in (status.get("ops") or ())     # a service older than the op lists none
        self.base_id = clip_id or f"oavm-batch-{socket.gethostname()}-{os.getpid()}"
        self.downsample_ratio = downsample_ratio
        self.reply_dtype = reply_dtype
        self.clip_id = self.base_id
        self.direction, self.anchor = 1, 0

    def start(self, direction: int, anchor: int) -> None:
        self.direction, self.anchor = direction, anchor
        self.clip_id = f"{self.base_id}-{'fwd' if direction > 0 else 'bwd'}"

    def _index(self, position: int) -> int:
        return self.anchor + position * self.direction

    def step(self, position, rgb, prompts, known):
        index, c = self._index(position), self.client
        if position == 0:
            result = c.open_clip(self.clip_id, index, rgb, prompts, direction=self.direction, restart=True,
                                 downsample_ratio=self.downsample_ratio, reply_dtype=self.reply_dtype)
        elif not prompts:
            result = c.matte(self.clip_id, index, rgb)
        elif len(prompts) == 1:          # the ops every service knows
            (obj_id, mask), = prompts.items()
            call = c.reprompt if obj_id in known else c.add_object
            result = call(self.clip_id, index, rgb, obj_id, mask)
        else:                            # several objects keyed on this frame: one step, as in-process
            result = c.prompt(self.clip_id, index, rgb, prompts)
        return {o: Layer(np.array(d["alpha"]), np.array(d["fgmask"])) for o, d in result.layers.items()}

    def save(self, path: Path) -> None:
        self.client.save_clip(self.clip_id, str(path.resolve()))

    def load(self, path: Path) -> None:
        self.client.load_clip(self.clip_id, str(path.resolve()))

    def close(self) -> None:
        for suffix in ("fwd", "bwd"):
            try:
                self.client.close_clip(f"{self.base_id}-{suffix}")
            except Exception:  # the service may be gone already; nothing is left to clean then
                pass
        self.client.close()


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """One line per frame, plus ``Progress: N%`` lines (Deadline's stdout handler) or a bar on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = max(total, 1)
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def note(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.tty:
            self._bar()
        self.stream.flush()

    def advance(self, text: str) -> None:
        self.done += 1
        self.note(text)
        if not self.tty:
            self.stream.write(f"Progress: {self.percent}%\n")
            self.stream.flush()

    @property
    def percent(self) -> int:
        return min(100, int(100 * self.done / self.total))

    def _bar(self, width: int = 30) -> None:
        filled = int(width * self.done / self.total)
        self.stream.write(f"[{'#' * filled}{'.' * (width - filled)}] {self.percent:3d}% {self.done}/{self.total}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------------------ planning


def plan_passes(frames: list[int], keys: Mapping[int, dict[str, KeyMask]]) -> list[Pass]:
    """The forward pass from the first keyframe and the backward pass for frames before it.

    ``frames`` are the frames to write (a farm chunk is trusted). Frames between the first keyframe and the
    chunk are stepped without writing (lead-in), at the chunk's own frame step, so every chunk of a shot sees
    the same sequence of frames as one uninterrupted run; later keyframes are always stepped (they re-prompt).
    """
    first_key = min(keys)
    wanted = set(frames)
    step = _uniform_step(sorted(frames))
    passes = []
    ahead = sorted(f for f in frames if f >= first_key)
    if ahead:
        path = set(ahead) | {k for k in keys if first_key <= k <= ahead[-1]}
        path |= set(_lead_in(first_key, ahead[0], step))
        passes.append(Pass("forward", +1, [Step(f, keys.get(f, {}), f in wanted) for f in sorted(path)]))
    behind = sorted((f for f in frames if f < first_key), reverse=True)
    if behind:
        path = set(behind) | set(_lead_in(first_key, behind[0], step)) | {first_key}
        steps = [Step(f, keys[first_key] if f == first_key else {}, f in wanted and f != first_key)
                 for f in sorted(path, reverse=True)]
        passes.append(Pass("backward", -1, steps))
    return passes


def _uniform_step(frames: list[int]) -> int:
    gaps = {b - a for a, b in zip(frames, frames[1:])}
    return gaps.pop() if len(gaps) == 1 else 1


def _lead_in(anchor: int, target: int, step: int) -> range:
    """Frames strictly between the anchor keyframe and the first frame to write, walking toward the target."""
    direction = 1 if target > anchor else -1
    step = step if (target - anchor) % step == 0 else 1
    return range(anchor + direction * step, target, direction * step)


def _mask_identity(key: KeyMask) -> str:
    """A mask file by content identity (path, size, mtime), so an edited mask invalidates saved states."""
    try:
        st = os.stat(key.path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return f"{os.path.abspath(key.path)}:{key.index}:{stamp}"


# ------------------------------------------------------------------------------------------------ the runner


class BatchJob:
    """One ``oavm batch`` run: checks the inputs, plans the passes, steps the clip, writes the frames."""

    def __init__(self, config: BatchConfig, *, stepper_factory: Callable[[], Stepper] | None = None,
                 on_frame: FrameCallback | None = None, stream: TextIO | None = None) -> None:
        self.config = config
        self.stream = stream or sys.stdout
        self.on_frame = on_frame
        self._stepper_factory = stepper_factory
        self._mask_cache: dict[tuple, tuple[ImageHeader, np.ndarray]] = {}
        self._progress: Progress | None = None
        self.output = FramePattern.parse(config.output)
        self.objects = config.objects
        self.source = FrameSource(config.input, first_frame=config.first_frame, colorspace=config.colorspace)
        try:
            self.frames = self._frames()
            self.keys = self._keys()
            self._check_outputs()
        except BaseException:
            self.source.close()
            raise

    # -- checks --------------------------------------------------------------------------------------------

    def _frames(self) -> list[int]:
        available = self.source.available_frames()
        frames = self.config.frames if self.config.frames is not None else available
        if not frames:
            raise OAVMInputError(f"no frames of {self.config.input} were found; check the path and the #### pattern.")
        missing = self.source.missing(frames)
        if missing:
            raise OAVMInputError(
                f"{len(missing)} input frame(s) are missing: {format_frame_range(missing)} (first: "
                f"{self.source.path_of(missing[0])}). Render them or narrow --frames.")
        return sorted(frames)

    def _keys(self) -> dict[int, dict[str, KeyMask]]:
        if not self.config.masks:
            raise OAVMInputError("give the object's mask at a keyframe: --mask [FRAME=]PATH "
                                 "(or --object NAME=[FRAME=]PATH for several objects).")
        # The shot's first frame: a sequence's first file on disk, a movie's first frame, a still's own frame.
        shot_start = self.frames[0] if self.source.kind == "image" else min(self.source.available_frames())
        keys: dict[int, dict[str, KeyMask]] = {}
        for key in self.config.masks:
            frame = key.frame
            if frame is None:
                if self.frames[0] != shot_start:
                    raise OAVMInputError(
                        f"say which frame the mask {key.path} belongs to: --frames starts at {self.frames[0]} but the "
                        f"shot at {shot_start}; write --mask FRAME={key.path} (e.g. --mask {shot_start}={key.path}).")
                frame = shot_start
            path = str(FramePattern.parse(key.path).path(frame))
            if not Path(path).is_file():
                raise OAVMInputError(f"the mask {path} (object {key.obj_id!r}, frame {frame}) does not exist.")
            if self.source.missing([frame]):
                raise OAVMInputError(f"the keyframe {frame} of object {key.obj_id!r} has no input frame "
                                     f"({self.source.path_of(frame)}); key a frame that exists.")
            if key.obj_id in keys.get(frame, {}):
                raise OAVMInputError(f"object {key.obj_id!r} has two masks at frame {frame}; give one.")
            keys.setdefault(frame, {})[key.obj_id] = KeyMask(key.obj_id, path, frame, key.index)
        for frame, masks in keys.items():
            for key in masks.values():
                self._read_mask(key)               # refuse a bad mask now, not after an hour of frames
        return dict(sorted(keys.items()))

    def _check_outputs(self) -> None:
        suffix = Path(self.config.output).suffix.lower()
        if self.config.output_mode not in ("matte", "rgba"):
            raise OAVMInputError(f"--output-mode is {self.config.output_mode!r}; use 'matte' or 'rgba'.")
        if suffix != ".exr" and self.config.output_mode == "matte" and len(self.objects) > 1:
            raise OAVMInputError(f"{len(self.objects)} objects need an EXR output (one layer each); write "
                                 "--output '...####.exr', or --output-mode rgba for their combined alpha.")
        if len(self.frames) > 1 and not self.output.is_sequence:
            raise OAVMInputError(f"--output {self.config.output} names one file for {len(self.frames)} frames; "
                                 "put the frame number in it, e.g. 'out/matte.####.exr'.")
        for frame in (self.frames[0], self.frames[-1]):
            if self.source.kind != "movie" and \
                    os.path.abspath(self.output_path(frame)) == os.path.abspath(self.source.path_of(frame)):
                raise OAVMInputError(f"--output would overwrite the input {self.source.path_of(frame)}; "
                                     "write the mattes somewhere else.")

    # -- per-frame pieces ----------------------------------------------------------------------------------

    def output_path(self, frame: int) -> Path:
        return self.output.path(frame)

    def channels(self) -> list[str]:
        if self.config.output_mode == "rgba":
            return ["R", "G", "B", "A"]
        if Path(self.config.output).suffix.lower() != ".exr":
            return ["A"]
        return [f"{o}.{c}" for o in self.objects for c in ("A", "fgmask")]

    def output_windows(self, header: ImageHeader) -> tuple[Window, Window]:
        """EXR keeps the plate's data and display windows; PNG/TIFF have none, so they get the full frame."""
        if Path(self.config.output).suffix.lower() == ".exr":
            return header.data_window, header.display_window
        return header.display_window, header.display_window

    def output_problem(self, frame: int, checkpoint_sha256: str) -> str | None:
        """Why ``frame``'s output must be (re)written, or None when it is complete."""
        if self.config.overwrite:
            return "overwrite"
        path = self.output_path(frame)
        try:
            data, display = self.output_windows(self.source.header(frame))
        except OAVMInputError as exc:           # reported in order, when the job reaches this frame
            return str(exc)
        problem = verify_image(path, channels=self.channels(), data_window=data, display_window=display)
        if problem is None:
            written_by = read_header(path).attributes.get("oavm:checkpoint_sha256")
            if written_by is not None and written_by != checkpoint_sha256:
                problem = "written with another checkpoint"
        return problem

    def _read_mask(self, key: KeyMask) -> tuple[ImageHeader, np.ndarray]:
        index = key.index if key.index is not None else self.config.mask_index
        cache_key = (key.path, index, self.config.mask_channel)
        if cache_key not in self._mask_cache:
            header, mask = read_mask(key.path, channel=self.config.mask_channel, index=index)
            if not mask.any():
                raise OAVMInputError(f"the mask {key.path} of object {key.obj_id!r} is empty"
                                     f"{f' at index {index}' if index is not None else ''}; paint the object, or "
                                     "pick the right --mask-index/--mask-channel.")
            self._mask_cache[cache_key] = (header, mask)
        return self._mask_cache[cache_key]

    def prompt_masks(self, step: Step, plate: Plate) -> dict[str, np.ndarray]:
        masks = {}
        for obj_id, key in step.prompts.items():
            header, mask = self._read_mask(key)
            masks[obj_id] = align_to_window(mask, header, plate.header)
        return masks

    def write_frame(self, plate: Plate, layers: Mapping[str, Layer], stepper: Stepper, direction: int) -> Path:
        """The frame's EXR layers (or RGBA), with the plate's windows and where it came from in the header."""
        h, w = plate.rgb.shape[:2]
        zeros = np.zeros((h, w), np.float32)
        alphas = {o: layers[o].alpha if o in layers else zeros for o in self.objects}
        if self.config.output_mode == "rgba":
            combined = 1.0 - np.prod([1.0 - a for a in alphas.values()], axis=0)   # paper Eq. 10, for N objects
            rgb = plate.rgb * combined[..., None] if self.config.premultiply else plate.rgb
            pixels = np.concatenate([rgb, combined[..., None]], axis=-1)
        elif Path(self.config.output).suffix.lower() != ".exr":
            pixels = alphas[self.objects[0]][..., None]
        else:
            pixels = np.stack([p for o in self.objects
                               for p in (alphas[o], layers[o].fgmask if o in layers else zeros)], axis=-1)
        data, display = self.output_windows(plate.header)
        if data != plate.header.data_window:
            target = ImageHeader(plate.header.path, (), data, display, "")
            pixels = align_to_window(pixels, plate.header, target)
        metadata: dict[str, Any] = {
            "Software": f"OAVM {__version__}",
            "oavm:version": __version__,
            "oavm:checkpoint_sha256": stepper.checkpoint_sha256,
            "oavm:source_frame": plate.source,
            "oavm:source_frame_number": int(plate.frame),
            "oavm:objects": ",".join(self.objects),
            "oavm:direction": "forward" if direction > 0 else "backward",
            "ImageDescription": f"OAVM {__version__} matte of {plate.source} (frame {plate.frame})",
        }
        aspect = plate.header.attributes.get("PixelAspectRatio")
        if isinstance(aspect, float):
            metadata["PixelAspectRatio"] = aspect
        return write_image(self.output_path(plate.frame), pixels, self.channels(), data_window=data,
                           display_window=display, metadata=metadata,
                           straight_alpha=self.config.output_mode == "rgba" and not self.config.premultiply)

    # -- states --------------------------------------------------------------------------------------------

    def state_dir(self) -> Path:
        if self.config.state_dir:
            return Path(self.config.state_dir)
        head = os.path.basename(self.output.head).rstrip("._-") or "oavm"
        return Path(os.path.dirname(self.output.head) or ".") / f"{head}.oavm-state"

    def signature(self, stepper: Stepper) -> str:
        """What a saved state depends on besides the frames it saw: input, colour handling, model, device."""
        data = {"format": STATE_FORMAT, "input": os.path.abspath(self.config.input), "first": self.config.first_frame,
                "colorspace": self.config.colorspace.value, "channel": self.config.mask_channel,
                "index": self.config.mask_index, "ratio": self.config.downsample_ratio, "mode": stepper.mode,
                "checkpoint": stepper.checkpoint_sha256, **stepper.signature}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def _state_files(self, pas: Pass, frame: int) -> tuple[Path, Path]:
        base = self.state_dir() / f"{pas.name}.{frame}"
        return base.with_name(base.name + ".state"), base.with_name(base.name + ".json")

    def find_state(self, pas: Pass, before: int, signature: str) -> int:
        """The position of the latest usable saved state before step ``before`` (-1: none, start at the key)."""
        if self.config.overwrite or self.config.state_every <= 0:
            return -1
        for position in range(min(before, len(pas.steps)) - 1, -1, -1):
            data, meta_path = self._state_files(pas, pas.steps[position].frame)
            if not (data.is_file() and meta_path.is_file()):
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("signature") == signature and meta.get("history") == pas.history(position):
                return position
        return -1

    def save_state(self, stepper: Stepper, pas: Pass, position: int, signature: str) -> Path:
        data, meta_path = self._state_files(pas, pas.steps[position].frame)
        data.parent.mkdir(parents=True, exist_ok=True)
        stepper.save(data)
        meta = {"signature": signature, "history": pas.history(position), "frame": pas.steps[position].frame,
                "oavm": __version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = meta_path.with_name(meta_path.name + ".partial")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)               # written last: its presence says the state is complete
        return data

    # -- running -------------------------------------------------------------------------------------------

    def make_stepper(self) -> Stepper:
        if self._stepper_factory is not None:
            return self._stepper_factory()
        if self.config.connect:
            half_output = self.config.output_mode != "rgba" and Path(self.config.output).suffix.lower() == ".exr"
            return ServiceStepper(self.config.connect, self.config.clip_id, self.config.downsample_ratio,
                                  self.config.timeout_s, "float16" if half_output else "float32")
        from oavm_service.engine import Engine

        engine = Engine.from_checkpoint(self.config.checkpoint, device=self.config.device,
                                        precision=self.config.precision,
                                        cuda_graphs=None if self.config.cuda_graphs else False)
        return EngineStepper(engine, self.config.downsample_ratio)

    def run(self) -> int:
        stepper = self.make_stepper()
        try:
            return self._run(stepper)
        finally:
            stepper.close()
            self.source.close()

    def _run(self, stepper: Stepper) -> int:
        passes = plan_passes(self.frames, self.keys)
        together = sorted({s.frame for p in passes for s in p.steps[1:] if len(s.prompts) > 1})
        if together and not stepper.keys_together:          # refused now, not after an hour of frames
            raise OAVMInputError(
                f"frame(s) {format_frame_range(together)} key several objects at once, which the service at "
                f"{self.config.connect} cannot (it is older than its 'prompt' op); update the service, "
                "run without --connect, or key these objects on different frames.")
        signature = self.signature(stepper)
        say = self._say
        say(f"oavm batch {__version__}: {self.source.kind} {self.config.input}, frames "
            f"{format_frame_range(self.frames)} -> {self.config.output} ({stepper.mode}"
            f"{', checkpoint ' + stepper.checkpoint_sha256[:12] if stepper.checkpoint_sha256 else ''})")
        say("keyframes: " + "; ".join(f"{f}: " + ", ".join(f"{o}={k.path}" for o, k in m.items())
                                      for f, m in self.keys.items()))
        work = []
        for pas in passes:
            todo = {i for i, s in enumerate(pas.steps)
                    if s.write and self.output_problem(s.frame, stepper.checkpoint_sha256) is not None}
            start = self.find_state(pas, min(todo), signature) + 1 if todo else len(pas.steps)
            end = max(todo) + 1 if todo else 0
            work.append((pas, todo, start, end))
        # a killed run (SIGKILL gives no chance to tidy; farms kill nodes so) may have left half-written hidden files
        left = remove_left_temporaries(self.output_path(pas.steps[i].frame) for pas, todo, _, _ in work for i in todo)
        if left:
            say(describe_removed(left))
        skipped = len(self.frames) - sum(len(t) for _, t, _, _ in work)
        progress = Progress(skipped + sum(max(0, e - s) for _, _, s, e in work), self.stream)
        self._progress = progress
        for pas, todo, start, end in work:
            done = [f.frame for i, f in enumerate(pas.steps) if f.write and i not in todo]
            for frame in done:
                progress.advance(f"frame {frame}: {self.output_path(frame)} is complete, skipped")
            if todo:
                self._run_pass(stepper, pas, todo, start, end, signature, progress)
        progress.close()
        self._progress = None
        say(f"done: {len(self.frames)} frame(s) in {self.config.output}")
        return EXIT_OK

    def _run_pass(self, stepper: Stepper, pas: Pass, todo: set[int], start: int, end: int, signature: str,
                  progress: Progress) -> None:
        stepper.start(pas.direction, pas.steps[0].frame)
        if start > 0:
            data, _ = self._state_files(pas, pas.steps[start - 1].frame)
            try:
                stepper.load(data)
                progress.note(f"{pas.name}: resuming after frame {pas.steps[start - 1].frame} from {data}")
            except Exception as exc:  # a damaged or foreign state costs time, never the job
                progress.note(f"{pas.name}: cannot use the state {data} ({exc}); starting from the keyframe")
                stepper.start(pas.direction, pas.steps[0].frame)
                start = 0
        if start == 0:
            progress.note(f"{pas.name}: from keyframe {pas.steps[0].frame}")
        known = {o for s in pas.steps[:start] for o in s.prompts}      # objects the clip holds so far
        last_saved = start - 1
        periodic: list[int] = []
        # where a core is free, a frame's file is written while the next frame is in the network; its progress line
        # (in frame order) follows the write, and every state is saved only once the frames before it are on disk
        with ReadAhead(self.source.read, [s.frame for s in pas.steps[start:end]]) as plates, \
                WriteBehind(depth=2 if stepper.spare_cpu else 0) as writes:
            for position in range(start, end):
                step = pas.steps[position]
                t0 = time.perf_counter()
                try:
                    plate = plates.next()
                    masks = self.prompt_masks(step, plate)
                    layers = stepper.step(position, plate.network_rgb, masks, known)
                except OAVMInputError:
                    if last_saved < position - 1 and self.config.state_every > 0:
                        writes.flush()
                        self.save_state(stepper, pas, position - 1, signature)     # resume right here after a fix
                    raise
                known |= set(step.prompts)
                seconds = time.perf_counter() - t0
                if position in todo:
                    writes.submit(self.write_frame, plate, layers, stepper, pas.direction,
                                  then=self._written(progress, step, seconds, plate, layers))
                else:
                    what = ("recomputed (output already complete)" if step.write
                            else "lead-in, memory only (outside --frames)")
                    text = _progress_line(step, what, seconds)
                    writes.submit(lambda: None, then=lambda _, text=text: progress.advance(text))
                every = self.config.state_every
                periodic_now = every > 0 and (position + 1) % every == 0
                if periodic_now or (every > 0 and position == end - 1):
                    writes.flush()
                    self.save_state(stepper, pas, position, signature)
                    last_saved = position
                if periodic_now:                     # a run keeps its latest periodic state and its final one
                    for old in periodic:
                        for path in self._state_files(pas, pas.steps[old].frame):
                            path.unlink(missing_ok=True)
                    periodic = [position]

    def _written(self, progress: Progress, step: Step, seconds: float, plate: Plate, layers: Mapping[str, Layer]
                 ) -> Callable[[Path], None]:
        """What follows a frame's write, on the main thread: its progress line, then the caller's ``on_frame``."""
        def done(path: Path) -> None:
            progress.advance(_progress_line(step, f"wrote {path}", seconds))
            if self.on_frame is not None:
                self.on_frame(plate, layers)
        return done

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.note(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _progress_line(step: Step, what: str, seconds: float) -> str:
    """"frame 1004: wrote out/matte.1004.exr [mask: hero] (0.25 s)" (the time to read and matte the frame)."""
    prompted = f" [mask: {', '.join(step.prompts)}]" if step.prompts else ""
    return f"frame {step.frame}: {what}{prompted} ({seconds:.2f} s)"


# ------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which a farm would read as "model error": make it bad input (1)."""

    def error(self, message: str) -> None:
        raise OAVMInputError(f"{message} (see `oavm batch --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="oavm batch", description="Matte an image sequence or a movie headlessly, as a render farm job.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="exit codes: 0 done, 1 bad input, 2 model/device error, 3 out of GPU memory, "
                       "4 service unavailable (--connect), 130 interrupted. See docs/batch.md.")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", "-i", required=True,
                    help="plate: 'plate.####.exr', 'plate.%%04d.dpx', 'plate.@@@@.png', one image, or a movie")
    io.add_argument("--output", "-o", required=True, help="mattes: 'out/matte.####.exr' (or .png/.tif, 16-bit)")
    io.add_argument("--frames", "-f", help="farm syntax: 1001-1100, 1-100x2, 1,5,10-20 (default: all frames)")
    io.add_argument("--first-frame", type=int, default=0,
                    help="number of a movie's first frame (and of a single image) (default 0)")
    io.add_argument("--input-colorspace", default="auto", choices=[c.value for c in InputColorspace],
                    help="auto: float files are scene-linear (sRGB curve applied), others display-referred")
    io.add_argument("--output-mode", default="matte", choices=["matte", "rgba"],
                    help="matte: layers <object>.A and <object>.fgmask; rgba: the plate's RGB with the alpha in A")
    io.add_argument("--premultiply", action="store_true", help="rgba mode: multiply RGB by the alpha")
    masks = p.add_argument_group("masks (keyframes)")
    masks.add_argument("--mask", action="append", default=[], metavar="[FRAME=]PATH[:INDEX]",
                       help="the object's mask at a keyframe (repeat for more keyframes); without FRAME= the "
                            "shot's first frame")
    masks.add_argument("--object", action="append", default=[], metavar="NAME=[FRAME=]PATH[:INDEX]",
                       help="one of several objects, each its own EXR layer NAME.A / NAME.fgmask (repeatable)")
    masks.add_argument("--mask-channel", help="take the mask from this channel (e.g. hero.A of an EXR)")
    masks.add_argument("--mask-index", type=int, help="palette PNG / id image: the object's index")
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", help="model checkpoint (.safetensors); default: the shipped one")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    model.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    model.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="GPU: run every step eagerly instead of replaying the recorded steady-state step "
                            "as a CUDA graph (the default)")
    model.add_argument("--downsample-ratio", type=float, help="network resolution / frame resolution (default auto)")
    model.add_argument("--connect", metavar="ENDPOINT",
                       help="send the work to a running `oavm serve` (e.g. tcp://127.0.0.1:5590) instead")
    model.add_argument("--clip-id", help="--connect: the clip id on the service (default: per host and process)")
    model.add_argument("--timeout", type=float, default=120.0, help="--connect: seconds to wait per frame")
    resume = p.add_argument_group("resuming")
    resume.add_argument("--state-every", type=int, default=25,
                        help="save the clip state every N frames and at the end (0: never) (default 25)")
    resume.add_argument("--state-dir", help="where states go (default: <output folder>/<name>.oavm-state)")
    resume.add_argument("--overwrite", action="store_true",
                        help="recompute and rewrite every frame, ignoring finished outputs and saved states")
    return p


def parse_key(text: str, obj_id: str) -> KeyMask:
    m = _KEY_SPEC.match(text.strip())
    if not m or not m.group("path"):
        raise OAVMInputError(f"cannot read mask {text!r}; write [FRAME=]PATH[:INDEX], e.g. 1001=mask.1001.png")
    frame = int(m.group("frame")) if m.group("frame") is not None else None
    index = int(m.group("index")) if m.group("index") is not None else None
    return KeyMask(obj_id, m.group("path"), frame, index)


def parse_object(text: str) -> KeyMask:
    name, sep, rest = text.partition("=")
    if not sep or not _OBJECT_NAME.match(name):
        raise OAVMInputError(f"cannot read --object {text!r}; write NAME=[FRAME=]PATH with a NAME of letters, digits, "
                             "_ or - (it becomes the EXR layer NAME.A), e.g. --object hero=1001=hero.png")
    return parse_key(rest, name)


def parse_args(argv: list[str]) -> BatchConfig:
    a = build_parser().parse_args(argv)
    keys = [parse_key(t, DEFAULT_OBJECT) for t in a.mask] + [parse_object(t) for t in a.object]
    if a.state_every < 0:
        raise OAVMInputError("--state-every must be 0 (no states) or more.")
    if a.downsample_ratio is not None and not 0 < a.downsample_ratio <= 1:
        raise OAVMInputError("--downsample-ratio must be in (0, 1], e.g. 0.25 for 4K plates.")
    return BatchConfig(
        input=a.input, output=a.output, masks=keys,
        frames=parse_frame_range(a.frames) if a.frames else None, first_frame=a.first_frame,
        mask_channel=a.mask_channel, mask_index=a.mask_index,
        colorspace=InputColorspace.parse(a.input_colorspace), output_mode=a.output_mode, premultiply=a.premultiply,
        checkpoint=a.checkpoint, device=a.device, precision=a.precision, cuda_graphs=a.cuda_graphs,
        downsample_ratio=a.downsample_ratio,
        state_every=a.state_every, state_dir=a.state_dir, overwrite=a.overwrite, connect=a.connect,
        clip_id=a.clip_id, timeout_s=a.timeout)


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an exception that ended a run."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    text = str(exc).lower()
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text:
        return EXIT_OUT_OF_MEMORY
    from shared.protocol import ErrorCode, OAVMServiceError, OAVMServiceUnavailable

    if isinstance(exc, OAVMServiceUnavailable):             # before OSError: it is a ConnectionError too
        return EXIT_UNAVAILABLE
    if isinstance(exc, OAVMServiceError):
        if exc.code == ErrorCode.BUSY:
            return EXIT_UNAVAILABLE
        bad = (ErrorCode.BAD_INPUT, ErrorCode.TOO_LARGE, ErrorCode.OUT_OF_ORDER, ErrorCode.UNKNOWN_CLIP)
        return EXIT_BAD_INPUT if exc.code in bad else EXIT_MODEL
    if isinstance(exc, (OAVMInputError, OSError)):
        return EXIT_BAD_INPUT
    return EXIT_MODEL          # CheckpointError, other OAVMError, device/runtime failures


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, *, stream: TextIO | None = None) -> int:
    """``oavm batch``; returns the exit code (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = stream or sys.stdout
    previous = signal.signal(signal.SIGTERM, _interrupt)      # farm "cancel task": clean up like Ctrl-C
    try:
        config = parse_args(argv)
        return BatchJob(config, stream=out).run()
    except SystemExit as exc:                                 # --help
        return int(exc.code or 0)
    except BaseException as exc:  # every way out gets its documented code and a one-line reason
        code = exit_code(exc)
        if code == EXIT_INTERRUPTED:
            message = "interrupted; run the same command again to continue"
        elif code == EXIT_MODEL and not isinstance(exc, (OAVMError, CheckpointError)):
            message = f"{type(exc).__name__}: {exc}"
        else:
            message = str(exc)
        print(f"oavm batch: error: {message}", file=sys.stderr, flush=True)
        if code == EXIT_MODEL and not isinstance(exc, OAVMError):
            import traceback

            traceback.print_exc(file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
