# SPDX-License-Identifier: GPL-3.0-or-later
"""The request loop: send a gizmo's frames to the service in order, write the mattes into the cache.

Host-free: the Nuke layer supplies a ``FrameSource`` (it renders the Source and Mask inputs through Write nodes)
and a ``Progress`` (``nuke.ProgressTask``); the farm command and the tests supply their own.

One analysis run, for the frame list F (the order the model sees, see frameranges.py):

1. Validate the cache (cache.py): render frames in chunks, compute their chain keys, stop at the first position
   j whose matte is not valid. Everything before j is reused untouched.
2. Bring the service's clip to position j-1: the live session if the service still holds it there, else the
   latest saved state before j (``load_clip``) plus a replay of the frames after it, else a replay from F[0].
   A replay sends the same requests as the original run (the model is deterministic), its mattes are discarded.
3. Analyse j..end: ``open_clip`` with the Mask at F[0]; ``reprompt`` at every frame that has a correction
   ("Re-prompt here": the Mask input rendered at that frame, paper section 3: a prompt replaces the object's
   long-term memory); otherwise ``matte_file`` (a local service reads the rendered EXR itself) or ``matte``
   (pixels, for a remote service). Each matte is written to ``matte.<frame>.exr`` as soon as it arrives (where a
   core is free, on a worker thread while the next frame is matted), the manifest every few frames, and the
   service's clip state every ``state_every`` positions, so that a later re-prompt resumes near its frame instead
   of from F[0].

Cancelling (the progress dialog's button) stops after the current frame; what was written stays valid.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import exr
from .cache import CacheLayout, Manifest, StateRecord, chain_key, root_key
from .frameranges import compact
from .frames import load_mask, load_source, source_digest

OBJECT_ID = "fg"           # one object per gizmo; several objects = several gizmos (one clip id each)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class AnalysisError(RuntimeError):
    """The analysis cannot go on; the message is for the artist (status knob, farm log)."""


class FrameSource:
    """Renders a gizmo's inputs to EXR files. The Nuke layer implements this with Write nodes; tests with
    OpenImageIO. ``prepare`` may be called with frames already rendered (it should skip those)."""

    def prepare(self, frames: Sequence[int], layout: CacheLayout) -> None:
        """Make ``layout.source(f)`` exist for every f in ``frames`` (the Source input, RGB, scene-linear)."""
        raise NotImplementedError

    def render_mask(self, frame: int, layout: CacheLayout) -> None:
        """Make ``layout.prompt(frame)``: the Mask input at ``frame``, the chosen channel copied into alpha."""
        raise NotImplementedError

    def release(self, frames: Sequence[int], layout: CacheLayout) -> None:
        """Delete the Source renders of ``frames`` (temporary; the cache keeps only mattes and prompts)."""
        for frame in frames:
            try:
                os.remove(layout.source(frame))
            except OSError:
                pass


class Progress:
    """Where the loop reports; the default prints nothing and is never cancelled."""

    def update(self, done: int, total: int, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class PrintProgress(Progress):
    """Progress for the farm log: a line at most every ``every_s`` seconds, and the last one."""

    def __init__(self, write: Callable[[str], None] = print, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every_s, self.clock = write, every_s, clock
        self._last = None

    def update(self, done: int, total: int, message: str) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s or done >= total:
            self._last = now
            self.write("[oavm] %3d%% %s" % (100 * done // max(total, 1), message))


@dataclass
class AnalysisSettings:
    clip_id: str
    frames: List[int]                     # in analysis order
    layout: CacheLayout
    local: bool = True                    # the service runs on this machine: it reads the renders itself
    downsample_ratio: Optional[float] = None
    chunk: int = 8                        # frames rendered per nuke.execute call
    state_every: int = 25                 # save the service's clip state every this many positions (0: never)
    manifest_every: int = 10              # save the manifest every this many frames (and at the end)
    matte_pixel_type: int = exr.HALF      # cache precision: half, as mattes are usually kept (FLOAT in tests)
    write_behind: Optional[bool] = None   # write each matte while the next frame is matted; None: where a core
                                          # is free (a service on a GPU or another machine: core_is_free)

    def __post_init__(self) -> None:
        if not self.frames:
            raise AnalysisError("the frame range is empty; set 'frame range' on the gizmo")
        if len(set(self.frames)) != len(self.frames):
            raise AnalysisError("a frame appears twice in the frame range; each frame can be analysed once")
        self.chunk = max(1, int(self.chunk))


@dataclass
class AnalysisReport:
    frames: int = 0
    computed: int = 0                     # mattes written by this run
    reused: int = 0                       # valid mattes kept from before
    replayed: int = 0                     # frames re-sent only to rebuild the model's memory
    resumed_from: str = ""                # "start", "live session", "saved state at frame N"
    cancelled: bool = False
    seconds: float = 0.0
    first_computed: Optional[int] = None

    def describe(self) -> str:
        if self.cancelled:
            head = "cancelled: %d of %d frames cached" % (self.reused + self.computed, self.frames)
        elif self.computed == 0:
            head = "up to date: %d frames cached" % self.frames
        else:
            head = "analysed %d frames from %d (%s), reused %d" % (self.computed, self.first_computed,
                                                                   self.resumed_from, self.reused)
        fps = self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0
        return head + (" - %.1f frames/s" % fps if fps else "")


def is_local_endpoint(endpoint: str) -> bool:
    """ipc:// and loopback tcp:// endpoints: the service shares this machine's files (``matte_file`` allowed)."""
    endpoint = endpoint.strip().lower()
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOCAL_HOSTS


def checkpoint_identity(status: dict) -> str:
    """The checkpoint's sha256 from ``client.status()`` (another model invalidates every cached matte)."""
    for holder in (status.get("checkpoint"), status.get("model"), status):
        if isinstance(holder, dict):
            for key in ("sha256", "checkpoint_sha256"):
                if holder.get(key):
                    return str(holder[key])
    return repr(sorted((k, str(v)) for k, v in status.items() if k in ("checkpoint", "model")))


def write_matte(path: str, alpha: np.ndarray, fgmask: np.ndarray, pixel_type: int = exr.HALF) -> None:
    """One cache frame: A = alpha, G = fgmask and R = alpha (so the viewer shows alpha red, fgmask green)."""
    exr.write_exr(path, {"A": alpha, "R": alpha, "G": fgmask}, pixel_type=pixel_type, compression=exr.ZIP)


class Analyzer:
    """One gizmo's analysis against one client (``shared.client.OAVMClient``)."""

    def __init__(self, client, settings: AnalysisSettings, source: FrameSource, progress: Optional[Progress] = None,
                 *, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.s = settings
        self.source = source
        self.progress = progress or Progress()
        self.clock = clock
        self.layout = settings.layout
        self.manifest = Manifest.load(self.layout.manifest, settings.clip_id)
        self._digests: Dict[int, str] = {}      # frame -> source digest (this run)
        self._keys: List[str] = []              # chain key per position, computed lazily in order
        self._mask_cache: Dict[int, np.ndarray] = {}
        self._corrections: set = set()
        self._full: Dict[int, bool] = {}           # frame -> the service may read the render itself
        self._write_behind = False                 # decided in run(), from the service's status

    # ------------------------------------------------------------------------------------------ corrections
    def add_correction(self, frame: int) -> None:
        """"Re-prompt here": render the Mask input at ``frame`` and make it a prompt of the next run."""
        if frame not in self.s.frames:
            raise AnalysisError("frame %d is outside the analysed range %s; move to a frame inside it, or widen "
                                "'frame range'" % (frame, compact(self.s.frames)))
        self.layout.make_dirs()
        self.source.render_mask(frame, self.layout)
        _, digest = load_mask(self.layout.prompt(frame))
        self.manifest.prompts[frame] = digest
        self.manifest.save(self.layout.manifest)

    def clear_corrections(self) -> None:
        """Forget every re-prompt (the next run invalidates from the first corrected frame)."""
        if not os.path.isdir(self.layout.root):
            return
        for frame in list(self.manifest.prompts):
            if frame != self.s.frames[0]:
                del self.manifest.prompts[frame]
        self.manifest.save(self.layout.manifest)

    @property
    def corrections(self) -> List[int]:
        """The re-prompted frames of this frame list, in frame order."""
        in_range = set(self.s.frames)
        return sorted(f for f in self.manifest.prompts if f in in_range and f != self.s.frames[0])

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> AnalysisReport:
        start = self.clock()
        report = AnalysisReport(frames=len(self.s.frames))
        self.layout.make_dirs()
        from shared.files import remove_left_temporaries   # imported here: the core stays importable alone
        # hidden half-written cache files that a crashed Nuke left (its own writers remove theirs when they fail)
        remove_left_temporaries([self.layout.manifest] + [self.layout.matte(f) for f in self.s.frames])
        status = self.client.status()
        root = root_key(checkpoint_identity(status), OBJECT_ID, self.s.downsample_ratio)
        self._write_behind = self.s.write_behind
        if self._write_behind is None:
            from shared.write_behind import core_is_free   # imported here: the core stays importable alone
            self._write_behind = core_is_free(status, self.client.endpoint)
        if self.manifest.root != root:
            self.manifest.reset(root)
        first = self.s.frames[0]
        self.source.render_mask(first, self.layout)              # the Mask input may have changed since last time
        _, self.manifest.prompts[first] = load_mask(self.layout.prompt(first))
        self._keys = []
        self._corrections = set(self.corrections)
        try:
            j = self._first_invalid(report)
            report.reused = j
            if j < len(self.s.frames) and not self._cancel(report, j):
                self._analyse_from(j, report)
        finally:
            self.source.release(self.s.frames, self.layout)
            self.manifest.save(self.layout.manifest)
            report.seconds = self.clock() - start
        return report

    def _cancel(self, report: AnalysisReport, done: int) -> bool:
        if self.progress.cancelled():
            report.cancelled = True
        return report.cancelled

    def _key(self, position: int) -> str:
        """Chain key of ``position``; renders and hashes frames up to it as needed."""
        while len(self._keys) <= position:
            i = len(self._keys)
            frame = self.s.frames[i]
            self._ensure_rendered(i)
            previous = self._keys[i - 1] if i else self.manifest.root
            self._keys.append(chain_key(previous, self._digest(frame), self._prompt_digest(i)))
        return self._keys[position]

    def _prompt_digest(self, position: int) -> Optional[str]:
        frame = self.s.frames[position]
        if position == 0 or frame in self._corrections:
            return self.manifest.prompts.get(frame)
        return None

    def _digest(self, frame: int) -> str:
        if frame not in self._digests:
            self._digests[frame], self._full[frame] = source_digest(self.layout.source(frame))
        return self._digests[frame]

    def _ensure_rendered(self, position: int) -> None:
        frame = self.s.frames[position]
        if not os.path.isfile(self.layout.source(frame)):
            chunk = self.s.frames[position:position + self.s.chunk]
            self.progress.update(position, len(self.s.frames), "rendering Source %s" % compact(sorted(chunk)))
            self.source.prepare(chunk, self.layout)

    def _first_invalid(self, report: AnalysisReport) -> int:
        """Length of the valid prefix; Source renders of validated chunks are released as it goes."""
        frames = self.s.frames
        for position, frame in enumerate(frames):
            if position % self.s.chunk == 0:
                self.progress.update(position, len(frames), "checking cached frames from %d" % frame)
                if position:
                    self.source.release(frames[position - self.s.chunk:position], self.layout)
            if not self.manifest.matte_valid(frame, position, self._key(position), self.layout.matte(frame)):
                return position
        return len(frames)

    # ------------------------------------------------------------------------------------------ service
    def _send(self, position: int):
        """The one request that processes ``position``; the same for a first run and a replay."""
        frame = self.s.frames[position]
        clip, path = self.s.clip_id, self.layout.source(frame)
        self._ensure_rendered(position)          # a replay may need frames released after validation
        self._digest(frame)
        if position == 0:
            return self.client.open_clip(clip, 0, load_source(path).display, {OBJECT_ID: self._mask(frame)},
                                         restart=True, downsample_ratio=self.s.downsample_ratio,
                                         reply_dtype="float16" if self.s.matte_pixel_type == exr.HALF else "float32")
        if frame in self._corrections:
            return self.client.reprompt(clip, position, load_source(path).display, OBJECT_ID, self._mask(frame))
        if self.s.local and self._full[frame]:
            return self.client.matte_file(clip, position, path)
        return self.client.matte(clip, position, load_source(path).display)

    def _mask(self, frame: int) -> np.ndarray:
        if frame not in self._mask_cache:
            mask, digest = load_mask(self.layout.prompt(frame))
            if digest != self.manifest.prompts.get(frame):
                raise AnalysisError("the saved re-prompt mask of frame %d changed on disk; press 'Re-prompt here' "
                                    "at frame %d again" % (frame, frame))
            self._mask_cache[frame] = mask
        return self._mask_cache[frame]

    def _resume(self, j: int, report: AnalysisReport) -> None:
        """Bring the service's clip to position j-1 (see the module docstring, step 2)."""
        if j == 0:
            report.resumed_from = "start"
            return
        session = self.manifest.session or {}
        if session.get("position") == j - 1 and session.get("key") == self._key(j - 1):
            report.resumed_from = "live session"
            return
        self._restore(j, report)

    def _restore(self, j: int, report: AnalysisReport) -> None:
        """Saved state (if any) + replay up to j-1; the live session was not usable."""
        s = self.manifest.best_state(self._keys, j) if self.s.state_every else None
        begin = 0
        if s is not None:
            info = self.client.load_clip(self.s.clip_id, self.manifest.states[s].path)
            expected = info.get("next_frame", s + 1) if isinstance(info, dict) else s + 1
            if expected == s + 1:
                begin = s + 1
                report.resumed_from = "saved state at frame %d" % self.s.frames[s]
        if begin == 0:
            report.resumed_from = "replay from the first frame" if j > 0 else "start"
        for position in range(begin, j):
            if self._cancel(report, position):
                return
            self.progress.update(position, len(self.s.frames),
                                 "rebuilding the model's memory: frame %d" % self.s.frames[position])
            self._key(position)
            self._send(position)
            report.replayed += 1
            self._release_behind(position)

    def _release_behind(self, position: int) -> None:
        if position and position % self.s.chunk == 0:
            self.source.release(self.s.frames[position - self.s.chunk:position], self.layout)

    def _analyse_from(self, j: int, report: AnalysisReport) -> None:
        from shared.protocol import ErrorCode, OAVMServiceError   # imported here: the core stays importable alone
        from shared.write_behind import WriteBehind
        for stale in [p for p in self.manifest.states if p >= j]:
            self._drop_state(stale)      # made from inputs before this change; rewritten as we go
        self._resume(j, report)
        if report.cancelled:
            return
        frames, total = self.s.frames, len(self.s.frames)
        report.first_computed = frames[j]
        t0 = self.clock()
        position = j
        # where a core is free, each matte is written while the service works on the next frame (at most two wait);
        # the manifest records a matte only once its file is complete, never a half-written one
        with WriteBehind(depth=2 if self._write_behind else 0) as writes:
            while position < total:
                frame = frames[position]
                key = self._key(position)
                try:
                    result = self._send(position)
                except OAVMServiceError as exc:
                    # The service lost or moved the clip we counted on (restart, LRU eviction): rebuild it once.
                    if report.resumed_from != "live session" or position != j or \
                            exc.code not in (ErrorCode.UNKNOWN_CLIP, ErrorCode.OUT_OF_ORDER):
                        raise
                    self._restore(j, report)
                    if report.cancelled:
                        return
                    continue
                layer = result.layers.get(OBJECT_ID)
                if layer is None:
                    raise AnalysisError("the service returned no matte for object %r at frame %d"
                                        % (OBJECT_ID, frame))
                path = self.layout.matte(frame)
                writes.submit(write_matte, path, layer["alpha"], layer["fgmask"], self.s.matte_pixel_type,
                              then=self._recorder(frame, position, key, path))
                self.manifest.session = {"position": position, "key": key}
                report.computed += 1
                if self.s.state_every and self.s.local and (position + 1) % self.s.state_every == 0 \
                        and position + 1 < total:
                    self._save_state(position, key)
                if report.computed % self.s.manifest_every == 0:
                    self.manifest.save(self.layout.manifest)
                self._release_behind(position)
                elapsed = self.clock() - t0
                fps = report.computed / elapsed if elapsed > 0 else 0.0
                self.progress.update(position + 1, total, "frame %d (%d/%d)%s" % (
                    frame, position + 1, total, " - %.1f frames/s" % fps if fps else ""))
                position += 1
                if position < total and self._cancel(report, position):
                    return

    def _recorder(self, frame: int, position: int, key: str, path: str) -> Callable[[None], None]:
        """What follows a matte's write (on this thread): the manifest's record of the complete file."""
        def record(_: None) -> None:
            self.manifest.record_matte(frame, position, key, path)
        return record

    def _save_state(self, position: int, key: str) -> None:
        """Keep the service's clip state at ``position`` in the cache, so a re-prompt later resumes from here."""
        self._drop_state(position)
        path = self.client.save_clip(self.s.clip_id, self.layout.state(position))
        self.manifest.states[position] = StateRecord(key, path)

    def _drop_state(self, position: int) -> None:
        rec = self.manifest.states.pop(position, None)
        if rec is not None:
            try:
                os.remove(rec.path)
            except OSError:
                pass
