# SPDX-License-Identifier: GPL-3.0-or-later
"""The matting job: stream a clip's frames to the OAVM service and write each frame's mattes as an EXR.

One run is: ``open_clip`` at the prompt frame with one mask per object (``restart=True``: whatever the service
still holds for this clip id is replaced), then every following frame in order, as the service expects
(architecture.md: frame k is followed by k + 1), through ``matte_stream``: the next frame is already at the service
while this one's mattes are written, so reading and writing plates here overlaps the network's work there.
"Re-prompt at frame k" is the same run started at k, with the artist's corrected masks for some objects and, for
the others, their own matte at k as the prompt (:func:`reprompt_prompts`), so the run replaces every frame from k
on and keeps the frames before it.

The job holds no ``bpy`` data: the add-on gathers a :class:`MatteJob` on Blender's main thread and runs it
either right there (headless, synchronous) or in a worker thread (core/worker.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .errors import MaskError, OAVMBlenderError
from .frames import matte_files
from .imageio import read_frame, read_matte_exr, write_matte_exr
from .raster import check_prompt_sizes
from .service import shared_module


@dataclass
class MatteJob:
    """Everything one run needs, as plain data."""
    clip_id: str
    frames: list[int]                      # scene frames in processing order; frames[0] carries the prompts
    frame_paths: Mapping[int, str]         # scene frame -> plate file
    prompts: dict[str, np.ndarray]         # object id -> (H, W) mask at frames[0]
    output_dir: str                        # mattes go to <output_dir>/matte.####.exr (#### = scene frame)
    colorspace: str = "auto"               # of the plates, see imageio.read_frame
    downsample_ratio: float | None = None  # None: the service chooses
    half: bool = True                      # EXR pixel type of the mattes
    empty_objects: list[str] = field(default_factory=list)   # objects lost before frames[0]: written as 0
    write_behind: bool | None = None       # write each matte while the next frame is read; None: where a core is
                                           # free (a service on a GPU or another machine)

    def check(self) -> None:
        """Refuse an incomplete job before anything is sent or written."""
        if not self.frames:
            raise OAVMBlenderError("the job has no frames: set a frame range with at least one frame")
        missing = [f for f in self.frames if f not in self.frame_paths]
        if missing:
            raise OAVMBlenderError(f"no plate file for frames {missing[:5]}: set the frame range within the clip")
        if self.frames != list(range(self.frames[0], self.frames[0] + len(self.frames))):
            raise OAVMBlenderError(f"the frames must follow each other ({self.frames[0]}, {self.frames[0] + 1}, ...): "
                                   f"set a frame range without a step")
        if not self.prompts:
            raise MaskError("no object to matte: give the first frame a mask with at least one layer")


@dataclass
class JobProgress:
    """Sent after each written frame."""
    done: int
    total: int
    frame: int
    seconds: float


@dataclass
class JobResult:
    """What a run did; ``cancelled`` runs keep the frames they wrote."""
    clip_id: str
    output_dir: str
    written: list[int]
    object_ids: list[str]
    cancelled: bool
    seconds: float


def reprompt_prompts(existing: Mapping[str, np.ndarray], corrected: Mapping[str, np.ndarray],
                     threshold: float = 0.5) -> tuple[dict[str, np.ndarray], list[str]]:
    """Prompts for a re-prompt: corrected masks as given, other objects from their own matte (alpha > threshold).

    Returns the prompts and the objects whose matte is already empty at that frame (the service cannot track an
    empty mask; they are written as empty layers so every frame keeps the same layers).
    """
    prompts = {obj: np.asarray(mask, dtype=np.float32) for obj, mask in corrected.items()}
    lost = []
    for obj, alpha in existing.items():
        if obj in prompts:
            continue
        mask = (np.asarray(alpha) > threshold).astype(np.float32)
        if mask.any():
            prompts[obj] = mask
        else:
            lost.append(obj)
    return prompts, lost


def existing_matte(output_dir: str, frame: int) -> dict[str, np.ndarray]:
    """The mattes an earlier run wrote for ``frame``; an error that says what to do when there are none."""
    path = matte_files(output_dir).path(frame)
    try:
        return read_matte_exr(path)
    except OAVMBlenderError:
        raise OAVMBlenderError(f"there is no matte of frame {frame} yet ({path}): run 'Matte Clip' first, or "
                               f"re-prompt at a frame the earlier run reached") from None


def run_job(client: Any, job: MatteJob, *, progress: Callable[[JobProgress], None] | None = None,
            cancel: threading.Event | None = None) -> JobResult:
    """Run ``job`` against ``client`` (an OAVMClient); returns when done, cancelled or on the first error.

    Errors propagate (the files already written stay, each complete); ``cancel`` is checked between frames.
    """
    job.check()
    started = time.monotonic()
    files = matte_files(job.output_dir)
    shared = shared_module()
    # hidden half-written mattes of these frames that a crashed Blender (or a killed job) left behind
    shared.files.remove_left_temporaries(files.path(number) for number in job.frames)
    written: list[int] = []
    first = job.frames[0]
    frame = read_frame(job.frame_paths[first], job.colorspace)
    check_prompt_sizes(job.prompts, frame.shape[:2], f"frame {first}")
    result = client.open_clip(job.clip_id, first, frame, job.prompts, restart=True,
                              downsample_ratio=job.downsample_ratio,
                              reply_dtype="float16" if job.half else "float32")   # what the EXR stores
    object_ids = list(job.prompts) + [obj for obj in job.empty_objects if obj not in job.prompts]
    shape = frame.shape[:2]
    rest = (read_frame(job.frame_paths[number], job.colorspace) for number in job.frames[1:])
    results = client.matte_stream(job.clip_id, first + 1, rest)      # lazy: nothing is sent before next()
    cancelled = False
    behind = job.write_behind
    if behind is None:
        behind = shared.write_behind.core_is_free(client.status(), client.endpoint)

    def write(number: int, layers: dict[str, np.ndarray]) -> int:
        write_matte_exr(files.path(number), layers, half=job.half)
        return number

    def done(number: int) -> None:          # on this thread, in frame order, once the file is complete
        written.append(number)
        if progress is not None:
            progress(JobProgress(len(written), len(job.frames), number, time.monotonic() - started))

    try:
        # where a core is free, each matte is written on a worker thread while the next frame is read and sent
        with shared.write_behind.WriteBehind(depth=2 if behind else 0) as writes:
            for index, number in enumerate(job.frames):
                if index > 0:
                    if cancel is not None and cancel.is_set():
                        cancelled = True       # the frame already at the service is matted there, not written
                        break
                    result = next(results)
                writes.submit(write, number, _alpha_layers(result.layers, object_ids, shape), then=done)
    finally:
        results.close()
        _close_quietly(client, job.clip_id)
    return JobResult(job.clip_id, job.output_dir, written, object_ids, cancelled, time.monotonic() - started)


def _alpha_layers(layers: Mapping[str, Mapping[str, np.ndarray]], object_ids: list[str],
                  shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """``{object: alpha}`` in a fixed order; an object the reply lacks (lost earlier) is an empty layer."""
    return {obj: layers[obj]["alpha"] if obj in layers else np.zeros(shape, np.float32) for obj in object_ids}


def _close_quietly(client: Any, clip_id: str) -> None:
    """Free the clip's memory on the service; a service that went away meanwhile is not a second error."""
    try:
        client.close_clip(clip_id)
    except Exception:  # noqa: BLE001 - the run's own outcome (or error) is what the artist needs to see
        pass
