# SPDX-License-Identifier: GPL-3.0-or-later
"""From Blender data to a plain :class:`~.core.job.MatteJob`, and from a finished job back to Blender.

Runs on the main thread only. Gathering reads the scene settings (``scene.oavm``), resolves the plates to files
(a movie file is first decoded to a PNG sequence by Blender's own decoder, since OpenImageIO in Blender reads no
movies), rasterises the first-frame mask and picks the output folder. Applying a result updates the "OAVM Matte"
node group. A running modal job is polled by a ``bpy.app.timers`` callback (:func:`_poll_running`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import bpy
import numpy as np
from bpy.app.handlers import persistent

from . import nodes
from .core.clipid import check_clip_id, default_clip_id
from .core.errors import MaskError, OAVMBlenderError, SourceError
from .core.frames import FrameMap, FrameRange, SequenceFiles
from .core.imageio import colorspace_from_blender, image_size
from .core.job import JobResult, MatteJob, existing_matte, reprompt_prompts
from .core.raster import (BezierSpline, MaskLayerShape, check_prompt_sizes, mask_from_pixels,
                          object_ids_from_names, rasterise_mask)
from .core.worker import JobEvent, JobThread


# ------------------------------------------------------------------------------------------------ plates
@dataclass
class Plates:
    """The clip's frames as files, and the scene frames they cover."""
    name: str
    datablock: bpy.types.ID
    paths: dict[int, str]            # scene frame -> file (filled for the frames of the job)
    available: FrameRange
    size: tuple[int, int]            # (width, height)
    colorspace: str
    temp_dir: str | None = None      # decoded movie frames, removed after the job
    files: SequenceFiles | None = None
    frame_map: FrameMap | None = None


def _abspath(datablock: bpy.types.ID) -> str:
    return os.path.normpath(bpy.path.abspath(datablock.filepath, library=datablock.library))


def _image_user_map(scene: bpy.types.Scene, image: bpy.types.Image) -> FrameMap:
    """How the compositor shows ``image``: its Image node's frame start/offset; else file number = scene frame."""
    tree = nodes.compositor_tree(scene)
    for node in (tree.nodes if tree is not None else ()):
        if node.bl_idname == "CompositorNodeImage" and node.image == image:
            return FrameMap.blender_image_user(node.frame_start, node.frame_offset)
    return FrameMap(0, 0)


def source_datablock(settings) -> bpy.types.ID:
    source = settings.clip if settings.source_type == "CLIP" else settings.image
    if source is None:
        what = "Movie Clip" if settings.source_type == "CLIP" else "Image Sequence"
        raise SourceError(f"no {what} is chosen: pick the clip to matte in the OAVM Matte panel")
    return source


def find_plates(scene: bpy.types.Scene, settings) -> Plates:
    """Resolve the chosen Movie Clip or image sequence to its files (movies: to the frames the movie has)."""
    source = source_datablock(settings)
    path = _abspath(source)
    colorspace = (colorspace_from_blender(source.colorspace_settings.name)
                  if settings.colorspace == "FROM_DATABLOCK" else settings.colorspace)
    if isinstance(source, bpy.types.MovieClip) and source.source == "MOVIE":
        if not os.path.isfile(path):
            raise SourceError(f"the movie of clip {source.name!r} is missing ({path}): re-link it "
                              f"(File > External Data > Find Missing Files)")
        first = source.frame_start - source.frame_offset
        available = FrameRange(first, first + max(source.frame_duration, 1) - 1)
        width, height = source.size
        # decode_movie applies the clip's colour space and writes display-referred PNGs
        return Plates(source.name, source, {}, available, (width, height), "display")
    if isinstance(source, bpy.types.Image) and source.source != "SEQUENCE":
        raise SourceError(f"image {source.name!r} is a single {source.source.lower()}: set its Source to Image "
                          f"Sequence, or use a Movie Clip")
    files = SequenceFiles.from_path(path)
    if isinstance(source, bpy.types.MovieClip):
        frame_map = FrameMap.blender_movie_clip(source.frame_start, source.frame_offset, files.number_of(path))
    else:
        frame_map = _image_user_map(scene, source)
    available = files.available_range(frame_map, f"{source.name!r}")
    width, height = image_size(files.path(frame_map.source_frame(available.start)))
    return Plates(source.name, source, {}, available, (width, height), colorspace, files=files, frame_map=frame_map)


def job_range(scene: bpy.types.Scene, settings, plates: Plates) -> FrameRange:
    """The frames to matte, checked against what the clip has."""
    if settings.range_mode == "CLIP":
        return plates.available
    if settings.range_mode == "SCENE":
        wanted = FrameRange(scene.frame_start, scene.frame_end)
    else:
        wanted = FrameRange(settings.frame_start, settings.frame_end)
    wanted.check_within(plates.available, f"clip {plates.name!r}")
    return wanted


def fill_paths(plates: Plates, frames: FrameRange) -> None:
    """Plate files for ``frames``; a movie is decoded to a temporary PNG sequence first."""
    if plates.files is not None:
        plates.paths = plates.files.paths_for(frames, plates.frame_map, f"clip {plates.name!r}")
        return
    plates.temp_dir = tempfile.mkdtemp(prefix="oavm-plates-")
    try:
        plates.paths = decode_movie(plates.datablock, frames, plates.temp_dir)
    except BaseException:
        shutil.rmtree(plates.temp_dir, ignore_errors=True)
        raise


def decode_movie(clip: bpy.types.MovieClip, frames: FrameRange, folder: str) -> dict[int, str]:
    """Render the clip's frames with Blender's movie decoder (a temporary sequencer scene) to 8-bit PNGs.

    The view transform is Standard with no look, so the PNGs hold the movie's display-referred pixel values.
    Blender is busy meanwhile (minutes for a long 4K movie): the mouse cursor counts the frames decoded and the
    console says how far it is.
    """
    scene = bpy.data.scenes.new("OAVM decode")
    progress = _DecodeProgress(scene.name, len(frames), os.path.basename(_abspath(clip)))
    try:
        editor = scene.sequence_editor_create()
        strips = editor.strips if hasattr(editor, "strips") else editor.sequences   # 4.4 renamed it
        strip = strips.new_movie("plate", _abspath(clip), 1, clip.frame_start - clip.frame_offset)
        strip.colorspace_settings.name = clip.colorspace_settings.name
        scene.render.resolution_x, scene.render.resolution_y = clip.size
        scene.render.resolution_percentage = 100
        scene.render.use_compositing = False
        scene.render.use_sequencer = True
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.color_mode = "RGB"
        scene.render.image_settings.color_depth = "8"
        scene.frame_start, scene.frame_end = frames.start, frames.end
        scene.render.filepath = os.path.join(folder, "plate.####.png")
        with progress:
            bpy.ops.render.render(animation=True, scene=scene.name)
    finally:
        bpy.data.scenes.remove(scene)
    files = SequenceFiles(os.path.join(folder, "plate."), ".png", 4)
    paths = {f: files.path(f) for f in frames.frames()}
    missing = [f for f, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise SourceError(f"Blender could not decode frames {missing[:5]} of the movie {_abspath(clip)}: check "
                          f"the file plays in the Movie Clip editor, or convert it to an image sequence")
    return paths


class _DecodeProgress:
    """Counts the frames of the decoding render as Blender writes them (``render_write``): the window manager's
    progress cursor, and a console line at most every two seconds and at the end."""

    def __init__(self, scene_name: str, total: int, what: str) -> None:
        self.scene_name, self.total, self.what = scene_name, total, what
        self.done, self._said = 0, 0.0
        self.wm = bpy.context.window_manager

    def __call__(self, scene: bpy.types.Scene, *_: object) -> None:
        if scene.name != self.scene_name:
            return
        self.done += 1
        self.wm.progress_update(self.done)
        now = time.monotonic()
        if now - self._said >= 2.0 or self.done == self.total:
            self._said = now
            print(f"OAVM: decoding {self.what}: {self.done}/{self.total} frame(s)", flush=True)

    def __enter__(self) -> "_DecodeProgress":
        self.wm.progress_begin(0, self.total)
        bpy.app.handlers.render_write.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in bpy.app.handlers.render_write:
            bpy.app.handlers.render_write.remove(self)
        self.wm.progress_end()


# ------------------------------------------------------------------------------------------------ masks
def mask_layer_shapes(mask: bpy.types.Mask, depsgraph: bpy.types.Depsgraph,
                      layer_names: list[str] | None = None) -> list[MaskLayerShape]:
    """The mask's layers (evaluated at the depsgraph's frame) as plain Bézier data; hidden-in-render skipped."""
    evaluated = mask.evaluated_get(depsgraph)
    shapes = []
    for layer in evaluated.layers:
        if layer.hide_render or (layer_names is not None and layer.name not in layer_names):
            continue
        splines = [BezierSpline(np.array([[p.handle_left[:], p.co[:], p.handle_right[:]] for p in s.points]),
                                cyclic=s.use_cyclic, fill=s.use_fill) for s in layer.splines if len(s.points)]
        shapes.append(MaskLayerShape(layer.name, splines, invert=layer.invert, fill_holes=layer.use_fill_holes))
    return shapes


def _image_pixels(image: bpy.types.Image) -> np.ndarray:
    """(H, W, C) float32, top row first (Blender stores images bottom-up)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise MaskError(f"mask image {image.name!r} has no pixels (missing file?): re-link or repaint it")
    flat = np.empty(width * height * image.channels, dtype=np.float32)
    image.pixels.foreach_get(flat)
    return flat.reshape(height, width, image.channels)[::-1]


def prompts_at(scene: bpy.types.Scene, settings, frame: int, size: tuple[int, int],
               *, only_active_layer: bool = False) -> dict[str, np.ndarray]:
    """The artist's masks at scene ``frame``: one per mask layer, or one from the mask image."""
    width, height = size
    if settings.mask_source == "MASK":
        mask = settings.mask
        if mask is None:
            raise MaskError("no Mask is chosen: draw a mask (one layer per object) over the first frame and pick "
                            "it in the OAVM Matte panel")
        names = None
        if only_active_layer:
            if not mask.layers or mask.layers.active is None:
                raise MaskError(f"mask {mask.name!r} has no active layer to re-prompt")
            names = [mask.layers.active.name]
        current = scene.frame_current
        if current != frame:
            scene.frame_set(frame)
        try:
            shapes = mask_layer_shapes(mask, bpy.context.evaluated_depsgraph_get(), names)
        finally:
            if scene.frame_current != current:
                scene.frame_set(current)
        return rasterise_mask(shapes, width, height)
    image = settings.mask_image
    if image is None:
        raise MaskError("no mask image is chosen: pick the image whose white (or opaque) pixels are the object")
    pixels = _image_pixels(image)
    (obj_id,) = object_ids_from_names([image.name])
    prompts = {obj_id: mask_from_pixels(pixels, use_alpha=settings.mask_source == "IMAGE_ALPHA", name=image.name)}
    check_prompt_sizes(prompts, (height, width), "the mask image")
    return prompts


# ------------------------------------------------------------------------------------------------ jobs
def clip_id_for(settings, plates: Plates) -> str:
    return check_clip_id(settings.clip_id.strip() or default_clip_id(bpy.data.filepath, plates.name))


def output_dir_for(settings, clip_id: str) -> str:
    folder = settings.output_dir.strip() or f"//oavm/{clip_id}/"
    if folder.startswith("//") and not bpy.data.filepath:
        raise OAVMBlenderError("the blend file is not saved, so //oavm/ has no place: save the file, or choose an "
                               "output folder in the OAVM Matte panel")
    return os.path.normpath(bpy.path.abspath(folder))


@dataclass
class PreparedJob:
    """A job and what is needed to apply its result afterwards.

    Datablocks are kept by name, not as ``bpy`` references: the artist may delete or rename things while the
    job runs, and a stale reference could crash Blender.
    """
    job: MatteJob
    scene_name: str
    source_name: str
    source_is_clip: bool
    temp_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def source(self) -> bpy.types.ID | None:
        return (bpy.data.movieclips if self.source_is_clip else bpy.data.images).get(self.source_name)


def prepare_matte(scene: bpy.types.Scene) -> PreparedJob:
    """The full run: every frame of the range, prompted at its first frame."""
    settings = scene.oavm
    plates = find_plates(scene, settings)
    frames = job_range(scene, settings, plates)
    clip_id = clip_id_for(settings, plates)
    output_dir = output_dir_for(settings, clip_id)
    prompts = prompts_at(scene, settings, frames.start, plates.size)
    fill_paths(plates, frames)
    return _prepared(scene, settings, plates, clip_id, output_dir, frames.frames(), prompts)


def prepare_reprompt(scene: bpy.types.Scene) -> PreparedJob:
    """Re-prompt at the current frame: corrected masks there, then re-matte to the end of the range."""
    settings = scene.oavm
    plates = find_plates(scene, settings)
    frames = job_range(scene, settings, plates)
    here = scene.frame_current
    if here not in frames:
        raise OAVMBlenderError(f"the current frame {here} is outside the matted frames {frames}: go to the frame "
                               f"to correct (or widen the frame range)")
    clip_id = clip_id_for(settings, plates)
    output_dir = output_dir_for(settings, clip_id)
    existing = existing_matte(output_dir, here)
    corrected = prompts_at(scene, settings, here, plates.size,
                           only_active_layer=settings.mask_source == "MASK" and not settings.reprompt_all_layers)
    prompts, lost = reprompt_prompts(existing, corrected)
    rest = FrameRange(here, frames.end)
    fill_paths(plates, rest)
    prepared = _prepared(scene, settings, plates, clip_id, output_dir, rest.frames(), prompts, lost)
    if lost:
        prepared.notes.append(f"objects {lost} have an empty matte at frame {here}; they stay empty")
    return prepared


def _prepared(scene: bpy.types.Scene, settings, plates: Plates, clip_id: str, output_dir: str, frames: list[int],
              prompts: dict[str, np.ndarray], lost: list[str] = ()) -> PreparedJob:
    job = MatteJob(clip_id=clip_id, frames=frames, frame_paths=plates.paths, prompts=prompts,
                   output_dir=output_dir, colorspace=plates.colorspace,
                   downsample_ratio=settings.downsample_ratio or None, half=settings.half_float,
                   empty_objects=list(lost))
    job.check()
    return PreparedJob(job, scene.name, plates.datablock.name, isinstance(plates.datablock, bpy.types.MovieClip),
                       plates.temp_dir)


def apply_result(prepared: PreparedJob, result: JobResult) -> str:
    """Update the node group for whatever was written; returns the line to report."""
    cleanup(prepared)
    if not result.written:
        return f"OAVM: cancelled before any frame of {result.clip_id} was written"
    group = nodes.update_matte_group(result.clip_id, result.output_dir, result.object_ids)
    scene = bpy.data.scenes.get(prepared.scene_name)
    if scene is not None:
        nodes.place_group(scene, group, prepared.source())
    done = f"{len(result.written)} frame(s) {result.written[0]}-{result.written[-1]}"
    verb = "cancelled after" if result.cancelled else "matted"
    return (f"OAVM: {verb} {done} of {result.clip_id} in {result.seconds:.1f} s -> {result.output_dir} "
            f"(node group {group.name!r})" + "".join(f"; {n}" for n in prepared.notes))


def cleanup(prepared: PreparedJob) -> None:
    if prepared.temp_dir:
        shutil.rmtree(prepared.temp_dir, ignore_errors=True)
        prepared.temp_dir = None


# ------------------------------------------------------------------------------------------------ running
@dataclass
class RunningJob:
    """The one modal job of this Blender session; ``outcome`` is set by the timer when it ends."""
    prepared: PreparedJob
    thread: JobThread
    outcome: tuple[str, str] | None = None     # ("INFO" | "WARNING" | "ERROR", message)


_running: RunningJob | None = None


def running() -> RunningJob | None:
    return _running


def start(prepared: PreparedJob, thread: JobThread) -> RunningJob:
    """Start ``thread`` and the timer that applies its events on the main thread."""
    global _running
    if _running is not None and _running.outcome is None:
        raise OAVMBlenderError(f"an OAVM job ({_running.prepared.job.clip_id}) is already running: wait for it, "
                               f"or press Esc over its window to cancel it")
    _running = RunningJob(prepared, thread.start())
    if not bpy.app.timers.is_registered(_poll_running):
        bpy.app.timers.register(_poll_running, first_interval=0.1)
    return _running


def _poll_running() -> float | None:
    """bpy.app.timers callback: progress to the window manager, results to the node group."""
    job = _running
    if job is None or job.outcome is not None:
        return None
    wm = bpy.context.window_manager
    for event in job.thread.poll():
        _apply_event(job, event, wm)
    return None if job.outcome is not None else 0.1


def _apply_event(job: RunningJob, event: JobEvent, wm: bpy.types.WindowManager) -> None:
    if event.kind == "progress":
        wm.progress_update(event.payload.done)
        return
    wm.progress_end()
    if event.kind == "done":
        try:
            job.outcome = ("WARNING" if event.payload.cancelled else "INFO", apply_result(job.prepared, event.payload))
        except Exception as exc:  # noqa: BLE001 - the artist gets a report, the mattes on disk stay
            job.outcome = ("ERROR", f"OAVM: mattes written to {job.prepared.job.output_dir}, but the node group "
                                    f"could not be updated: {exc}")
    else:
        cleanup(job.prepared)
        job.outcome = ("ERROR", event.payload)
    print(job.outcome[1])


def _abandon(reason: str) -> None:
    """Stop the running job without touching Blender data (its thread ends after the frame in flight)."""
    global _running
    if _running is None:
        return
    _running.thread.cancel()
    if bpy.app.timers.is_registered(_poll_running):
        bpy.app.timers.unregister(_poll_running)
    if _running.outcome is None:
        _running.outcome = ("WARNING", f"OAVM: job {_running.prepared.job.clip_id} cancelled: {reason}; the mattes "
                                       f"written so far stay in {_running.prepared.job.output_dir}")
        print(_running.outcome[1])
    cleanup(_running.prepared)
    _running = None


@persistent
def _on_load_pre(*_args) -> None:
    _abandon("another blend file was opened")


def register() -> None:
    bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    """Stop a running job when the add-on is disabled."""
    _abandon("the add-on was disabled")
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
