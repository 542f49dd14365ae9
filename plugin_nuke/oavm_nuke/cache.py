# SPDX-License-Identifier: GPL-3.0-or-later
"""Where a gizmo's files live, and which cached mattes are still valid.

Layout of one clip's cache folder (``<cache dir>/<clip id>/``)::

    matte.%04d.exr          the mattes the gizmo's Read node shows (A = alpha, G = fgmask); what renders use
    manifest.json           which inputs produced each matte (below)
    input/source.%04d.exr   the Source input rendered by a Write node for the service (deleted after use)
    prompts/mask.%04d.exr   the Mask input rendered at the first frame and at each "Re-prompt here" frame (kept)
    state/pos%06d.oavmstate the service's clip state every few frames, so a re-prompt resumes near its frame

Validity. The model is recurrent: the matte of frame k depends on every frame and prompt before it in the
analysed order. So each analysed position i gets a chain key, as in a hash chain::

    key(-1) = sha256(manifest format, key scheme, checkpoint, object, downsample ratio)
    key(i)  = sha256(key(i-1) | pixel data of source frame i | pixels of the prompt given at i, if any)

A cached matte is valid when the manifest records the key the current inputs give for its position and the file
is the one written then. The valid mattes are therefore always a prefix of the analysed order; editing the plate
at frame 40, or re-prompting at frame 40, keeps frames before 40 and re-analyses from 40 on. Keys never hash whole
files, because Nuke's Write stamps render times into EXR headers: a source frame counts by its pixel data as
stored (``exr.stored_pixels_digest``: chunks, channels, windows; no decoding), a prompt by its decoded pixels
(``pixel_digest``; prompts are few, and their digests are kept in the manifest as inputs).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import numpy as np

CACHE_FOLDER_NAME = "oavm_cache"
MANIFEST_FORMAT = 1
# What a source frame's part of a key hashes: 1 its decoded pixels, 2 its pixel data as stored (40x faster). In
# the root key, so that mattes cached under scheme 1 are analysed again once (the artist's re-prompts are kept).
KEY_SCHEME = 2


class CacheError(ValueError):
    """A cache folder that cannot be used; the message says what to set."""


def _posix(path: str) -> str:
    """Forward slashes: what Nuke's file knobs expect on every OS (Windows included)."""
    return path.replace("\\", "/")


def resolve_cache_dir(cache_dir: str, script_path: str) -> str:
    """The cache folder: the gizmo's ``cache_dir`` knob, or ``oavm_cache`` beside the saved script."""
    if cache_dir and cache_dir.strip():
        return _posix(os.path.abspath(os.path.expanduser(cache_dir.strip())))
    if not script_path or script_path == "Root":
        raise CacheError("the script is not saved yet, so there is no folder beside it for the OAVM cache: save the "
                         "script, or choose a folder in the gizmo's 'cache folder' knob")
    return _posix(os.path.join(os.path.dirname(os.path.abspath(script_path)), CACHE_FOLDER_NAME))


@dataclass(frozen=True)
class CacheLayout:
    """Every path of one clip's cache; patterns use ``%04d`` as Nuke's Read and Write nodes do."""
    root: str

    @classmethod
    def for_clip(cls, cache_dir: str, script_path: str, clip_id: str) -> "CacheLayout":
        return cls(_posix(os.path.join(resolve_cache_dir(cache_dir, script_path), clip_id)))

    def _join(self, *parts: str) -> str:
        return _posix(os.path.join(self.root, *parts))

    @property
    def matte_pattern(self) -> str:
        return self._join("matte.%04d.exr")

    @property
    def source_pattern(self) -> str:
        return self._join("input", "source.%04d.exr")

    @property
    def prompt_pattern(self) -> str:
        return self._join("prompts", "mask.%04d.exr")

    @property
    def manifest(self) -> str:
        return self._join("manifest.json")

    def matte(self, frame: int) -> str:
        return self.matte_pattern % frame

    def source(self, frame: int) -> str:
        return self.source_pattern % frame

    def prompt(self, frame: int) -> str:
        return self.prompt_pattern % frame

    def state(self, position: int) -> str:
        return self._join("state", "pos%06d.oavmstate" % position)

    def make_dirs(self) -> None:
        for sub in ("", "input", "prompts", "state"):
            try:
                os.makedirs(self._join(sub) if sub else self.root, exist_ok=True)
            except OSError as exc:
                raise CacheError("cannot create the OAVM cache folder %s (%s); choose a writable folder in the "
                                 "gizmo's 'cache folder' knob" % (self.root, exc.strerror)) from None


# ------------------------------------------------------------------------------------------------ keys

def pixel_digest(*planes: np.ndarray) -> str:
    """sha256 of decoded pixels (shape + float32 bytes): equal images give equal digests whatever the file."""
    h = hashlib.sha256()
    for plane in planes:
        a = np.ascontiguousarray(plane, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def root_key(checkpoint: str, object_id: str, downsample_ratio: Optional[float]) -> str:
    """key(-1): what invalidates everything (another model, object or working resolution)."""
    text = json.dumps({"format": MANIFEST_FORMAT, "keys": KEY_SCHEME, "checkpoint": checkpoint,
                       "object": object_id, "downsample_ratio": downsample_ratio}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def chain_key(previous: str, source_digest: str, prompt_digest: Optional[str]) -> str:
    """key(i) from key(i-1), the source pixels at i and the prompt given at i (None: no prompt there)."""
    return hashlib.sha256("|".join([previous, source_digest, prompt_digest or "-"]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ manifest

@dataclass
class FrameRecord:
    position: int      # index in the analysed order (the service's frame index)
    key: str           # chain key of that position
    size: int          # bytes of the matte file written then ...
    mtime_ns: int      # ... and its modification time: a replaced or damaged file no longer matches


@dataclass
class StateRecord:
    key: str
    path: str


@dataclass
class Manifest:
    """What the cache folder holds; saved as JSON beside the mattes."""
    clip_id: str
    root: str = ""                                             # root_key the records were made under
    frames: Dict[int, FrameRecord] = field(default_factory=dict)
    prompts: Dict[int, str] = field(default_factory=dict)      # frame -> pixel digest of prompts/mask.<frame>.exr
    states: Dict[int, StateRecord] = field(default_factory=dict)   # position -> saved service state
    session: Optional[dict] = None                             # {"position", "key"}: where the service's clip is
    format: int = MANIFEST_FORMAT

    @classmethod
    def load(cls, path: str, clip_id: str) -> "Manifest":
        """The manifest at ``path``; a fresh one if there is none, or if it is unreadable or someone else's."""
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != MANIFEST_FORMAT or data.get("clip_id") != clip_id:
                return cls(clip_id)
            return cls(
                clip_id=clip_id, root=data.get("root", ""),
                frames={int(k): FrameRecord(**v) for k, v in data.get("frames", {}).items()},
                prompts={int(k): str(v) for k, v in data.get("prompts", {}).items()},
                states={int(k): StateRecord(**v) for k, v in data.get("states", {}).items()},
                session=data.get("session"))
        except (OSError, ValueError, TypeError, KeyError):
            return cls(clip_id)

    def save(self, path: str) -> None:
        """Atomic, so that a crash mid-write never loses the records of frames already analysed."""
        data = asdict(self)
        for key in ("frames", "prompts", "states"):
            data[key] = {str(k): v for k, v in sorted(data[key].items())}
        from shared.files import remove_quietly, temporary_path   # imported here: the core stays importable alone
        tmp = str(temporary_path(path))
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            remove_quietly(tmp)

    def reset(self, root: str) -> None:
        """Forget every matte and state record (another checkpoint or settings); prompts stay, they are inputs."""
        self.root, self.frames, self.states, self.session = root, {}, {}, None

    def record_matte(self, frame: int, position: int, key: str, matte_path: str) -> None:
        st = os.stat(matte_path)
        self.frames[frame] = FrameRecord(position, key, st.st_size, st.st_mtime_ns)

    def matte_valid(self, frame: int, position: int, key: str, matte_path: str) -> bool:
        """True when the matte at ``matte_path`` was made from exactly these inputs and is untouched since."""
        rec = self.frames.get(frame)
        if rec is None or rec.key != key or rec.position != position:
            return False
        try:
            st = os.stat(matte_path)
        except OSError:
            return False
        return st.st_size == rec.size and st.st_mtime_ns == rec.mtime_ns

    def best_state(self, keys: list, before: int) -> Optional[int]:
        """The latest position < ``before`` whose saved state matches ``keys`` and still exists, or None."""
        for position in sorted(self.states, reverse=True):
            rec = self.states[position]
            if position < before and position < len(keys) and rec.key == keys[position] \
                    and os.path.isfile(rec.path):
                return position
        return None


# ------------------------------------------------------------------------------------------------ status

@dataclass
class CacheStatus:
    """How much of a frame list the cache covers, from the records alone (no rendering): for the status knob
    and for the farm command's final check."""
    frames: int
    cached: int
    missing: list

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        if self.complete:
            return "%d/%d frames cached" % (self.cached, self.frames)
        from .frameranges import compact
        return "%d/%d frames cached; missing %s" % (self.cached, self.frames, compact(self.missing))


def cache_status(layout: CacheLayout, clip_id: str, frames: list) -> CacheStatus:
    """Which frames have a recorded, untouched matte at their position in ``frames``."""
    manifest = Manifest.load(layout.manifest, clip_id)
    missing = []
    for position, frame in enumerate(frames):
        rec = manifest.frames.get(frame)
        if rec is None or rec.position != position or \
                not manifest.matte_valid(frame, position, rec.key, layout.matte(frame)):
            missing.append(frame)
    return CacheStatus(len(frames), len(frames) - len(missing), missing)
