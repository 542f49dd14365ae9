# SPDX-License-Identifier: GPL-3.0-or-later
"""The Blender add-on's plain logic (plugin_blender/core), without bpy: ids, frames, masks, EXRs, the job loop.

The job-loop tests run against a real OAVM service on loopback (tiny random checkpoint) and compare what the
add-on wrote with what the service returns to the client directly for the same frames and masks.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from plugin_blender.core import service as core_service
from plugin_blender.core.clipid import check_clip_id, default_clip_id
from plugin_blender.core.errors import FrameRangeError, MaskError, OAVMBlenderError, SourceError
from plugin_blender.core.frames import FrameMap, FrameRange, SequenceFiles, matte_files
from plugin_blender.core.imageio import colorspace_from_blender, read_frame, read_matte_exr, write_matte_exr
from plugin_blender.core.job import MatteJob, existing_matte, reprompt_prompts, run_job
from plugin_blender.core.raster import (BezierSpline, MaskLayerShape, check_prompt_sizes, mask_from_pixels,
                                        mask_to_pixels, object_ids_from_names, rasterise_layer, rasterise_mask)
from plugin_blender.core.worker import JobThread
from shared import OAVMClient, OAVMServiceUnavailable
from shared.colour import linear_to_srgb
from tests.blender.synthetic_clip import FRAMES, HEIGHT, WIDTH, direct_mattes, rect_mask, write_png
from tests.helpers.live_service import free_port

HALF_TOLERANCE = 1e-3   # half floats on [0, 1] are within 2**-11 of the float32 value


# ------------------------------------------------------------------------------------------------ clip ids
def test_default_clip_id_is_stable_readable_and_distinct(tmp_path):
    blend = str(tmp_path / "shot010.blend")
    first = default_clip_id(blend, "Plate Main.mov")
    assert first == default_clip_id(blend, "Plate Main.mov")            # same file + clip: same id on re-open
    assert first.startswith("plate-main-mov-")
    assert first != default_clip_id(str(tmp_path / "shot020.blend"), "Plate Main.mov")
    assert first != default_clip_id(blend, "Plate B.mov")
    assert check_clip_id(first) == first


@pytest.mark.parametrize("bad", ["", "../up", "a/b", "x" * 65, "-lead", "sp ace"])
def test_check_clip_id_refuses_unsafe_ids(bad):
    with pytest.raises(OAVMBlenderError, match="clip id"):
        check_clip_id(bad)


# ------------------------------------------------------------------------------------------------ frames
def test_frame_range_checks():
    assert FrameRange(3, 5).frames() == [3, 4, 5] and len(FrameRange(3, 5)) == 3
    with pytest.raises(FrameRangeError, match="reversed"):
        FrameRange(5, 3)
    with pytest.raises(FrameRangeError, match="covers scene frames 1-6"):
        FrameRange(4, 9).check_within(FrameRange(1, 6), "clip 'plate'")
    FrameRange(2, 6).check_within(FrameRange(1, 6), "clip 'plate'")


def test_sequence_files_follow_blenders_last_number_rule(tmp_path):
    files = SequenceFiles.from_path(tmp_path / "v2" / "shot.1001.exr")
    assert (files.digits, files.tail) == (4, ".exr")
    assert files.path(1002) == str(tmp_path / "v2" / "shot.1002.exr")
    assert files.path(12345).endswith("shot.12345.exr")
    assert SequenceFiles.number_of("/x/plate_0042.png") == 42
    with pytest.raises(SourceError, match="no frame number"):
        SequenceFiles.from_path(tmp_path / "still.png")


def test_available_range_maps_files_to_scene_frames_and_gaps_are_refused(tmp_path):
    for n in (1001, 1002, 1003):
        (tmp_path / f"p.{n}.png").write_bytes(b"")
    files = SequenceFiles.from_path(tmp_path / "p.1001.png")
    # an Image node with frame_start 1 and offset 1000 shows file 1001 at scene frame 1
    frame_map = FrameMap.blender_image_user(frame_start=1, frame_offset=1000)
    assert files.available_range(frame_map, "'p'") == FrameRange(1, 3)
    assert frame_map.source_frame(2) == 1002
    # a Movie Clip starting at scene frame 10 whose first file is 1001, offset 1: frame 10 shows file 1002
    assert FrameMap.blender_movie_clip(10, 1, 1001).source_frame(10) == 1002
    assert files.paths_for(FrameRange(2, 3), frame_map, "'p'") == {2: str(tmp_path / "p.1002.png"),
                                                                     3: str(tmp_path / "p.1003.png")}
    (tmp_path / "p.1002.png").unlink()
    assert files.available_range(frame_map, "'p'") == FrameRange(1, 3)
    assert list(files.paths_for(FrameRange(3, 3), frame_map, "'p'")) == [3]      # a range beside the gap is fine
    with pytest.raises(SourceError, match=r"no file for scene frames \[2\]"):
        files.paths_for(FrameRange(1, 3), frame_map, "'p'")
    with pytest.raises(SourceError, match="no file"):
        SequenceFiles.from_path(tmp_path / "q.0001.png").available_range(frame_map, "'q'")


def test_matte_files_are_numbered_by_scene_frame(tmp_path):
    assert matte_files(tmp_path).path(7) == str(tmp_path / "matte.0007.exr")


# ------------------------------------------------------------------------------------------------ masks
def _polygon(points, **kw) -> BezierSpline:
    """Straight edges: both handles on the control point."""
    pts = np.array([[p, p, p] for p in points], dtype=np.float64)
    return BezierSpline(pts, **kw)


def _rect(x0, y0, x1, y1, **kw) -> BezierSpline:
    return _polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], **kw)


def test_mask_space_is_blenders_aspect_corrected_frame():
    # 64x48: x spans the width; y is scaled so that 0.5 -+ 0.375 are the bottom and top edges
    corners = mask_to_pixels(np.array([[0.0, 0.125], [1.0, 0.875], [0.5, 0.5]]), 64, 48)
    np.testing.assert_allclose(corners, [[0, 48], [64, 0], [32, 24]])
    # a portrait frame scales x instead
    np.testing.assert_allclose(mask_to_pixels(np.array([[0.125, 0.0]]), 48, 64), [[0, 64]])


def test_rectangle_fills_exactly_the_pixels_whose_centres_are_inside():
    # x 0.25..0.75 -> columns 16..47; y 0.3125..0.6875 -> frame 0.25..0.75 -> rows 12..35
    mask = rasterise_layer(MaskLayerShape("box", [_rect(0.25, 0.3125, 0.75, 0.6875)]), WIDTH, HEIGHT)
    expected = np.zeros((HEIGHT, WIDTH), np.float32)
    expected[12:36, 16:48] = 1
    np.testing.assert_array_equal(mask, expected)


def test_bezier_circle_has_the_area_of_a_circle():
    k = 0.5522847498 * 0.25            # handle length of a 4-point Bézier circle of radius 0.25 (mask units)
    c = 0.5
    points = [  # (handle_left, co, handle_right), counter-clockwise from the right
        [(c + 0.25, c - k), (c + 0.25, c), (c + 0.25, c + k)],
        [(c + k, c + 0.25), (c, c + 0.25), (c - k, c + 0.25)],
        [(c - 0.25, c + k), (c - 0.25, c), (c - 0.25, c - k)],
        [(c - k, c - 0.25), (c, c - 0.25), (c + k, c - 0.25)],
    ]
    size = 200
    mask = rasterise_layer(MaskLayerShape("disc", [BezierSpline(np.array(points))]), size, size)
    assert mask.sum() == pytest.approx(math.pi * (0.25 * size) ** 2, rel=0.01)
    assert mask[size // 2, size // 2] == 1 and mask[0, 0] == 0


def test_layer_options_holes_invert_and_union():
    outer, inner = _rect(0.2, 0.2, 0.8, 0.8), _rect(0.4, 0.4, 0.6, 0.6)
    union = rasterise_layer(MaskLayerShape("o", [outer, inner]), 100, 100)
    ring = rasterise_layer(MaskLayerShape("o", [outer, inner], fill_holes=True), 100, 100)
    inverted = rasterise_layer(MaskLayerShape("o", [outer], invert=True), 100, 100)
    assert union[50, 50] == 1 and ring[50, 50] == 0 and ring[25, 25] == 1
    assert union.sum() == 60 * 60 and ring.sum() == 60 * 60 - 20 * 20
    assert inverted.sum() == 100 * 100 - 60 * 60


def test_unusable_mask_layers_are_refused_with_advice():
    with pytest.raises(MaskError, match="Alt\\+C"):
        rasterise_layer(MaskLayerShape("open", [_rect(0.2, 0.2, 0.8, 0.8, cyclic=False)]), 64, 48)
    with pytest.raises(MaskError, match="covers no pixel"):
        rasterise_mask([MaskLayerShape("off", [_rect(2, 2, 3, 3)])], 64, 48)
    with pytest.raises(MaskError, match="no layers"):
        rasterise_mask([], 64, 48)


def test_layers_become_object_ids_without_dots():
    prompts = rasterise_mask([MaskLayerShape("hero.001", [_rect(0.1, 0.3, 0.4, 0.6)]),
                              MaskLayerShape("dog", [_rect(0.6, 0.3, 0.9, 0.6)])], 64, 48)
    assert list(prompts) == ["hero_001", "dog"]
    with pytest.raises(MaskError, match="unique"):
        object_ids_from_names(["a.b", "a_b"])


def test_mask_images_by_luma_or_alpha_and_their_size():
    rgba = np.zeros((48, 64, 4), np.float32)
    rgba[10:20, 10:20, :3] = 1.0
    rgba[30:40, 30:40, 3] = 1.0
    luma = mask_from_pixels(rgba, use_alpha=False, name="m")
    alpha = mask_from_pixels(rgba, use_alpha=True, name="m")
    assert luma[15, 15] == pytest.approx(1.0) and luma[35, 35] == 0
    assert alpha[35, 35] == 1 and alpha[15, 15] == 0
    with pytest.raises(MaskError, match="no alpha"):
        mask_from_pixels(rgba[..., :3], use_alpha=True, name="m")
    with pytest.raises(MaskError, match="no pixel above 0.5"):
        mask_from_pixels(np.zeros((4, 4, 3)), use_alpha=False, name="m")
    with pytest.raises(MaskError, match="is 32x24 but the clip is 64x48"):
        check_prompt_sizes({"m": np.ones((24, 32))}, (48, 64), "mask image 'm'")


# ------------------------------------------------------------------------------------------------ images
def test_matte_exr_round_trip_layers_and_atomic_write(tmp_path):
    rng = np.random.default_rng(1)
    layers = {"hero": rng.random((48, 64), dtype=np.float32), "dog": rng.random((48, 64), dtype=np.float32)}
    path = write_matte_exr(tmp_path / "out" / "matte.0001.exr", layers)
    inp = oiio.ImageInput.open(str(path))
    assert sorted(inp.spec().channelnames) == ["dog.A", "hero.A"] and str(inp.spec().format) == "half"
    inp.close()
    back = read_matte_exr(path)
    for name in layers:
        np.testing.assert_allclose(back[name], layers[name], atol=HALF_TOLERANCE)
    assert os.listdir(path.parent) == ["matte.0001.exr"]          # no temporary file left behind
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError):
        write_matte_exr(blocked / "matte.0001.exr", layers)
    assert blocked.read_text() == "not a folder"


def test_plates_are_sent_display_referred(tmp_path):
    rgb = (np.arange(48 * 64 * 3) % 251).reshape(48, 64, 3).astype(np.uint8)
    write_png(tmp_path / "p.png", rgb)
    frame = read_frame(tmp_path / "p.png")
    assert frame.dtype == np.uint8 and np.array_equal(frame, rgb)      # integer plates go as they are
    linear = np.full((8, 8, 3), 0.214, np.float32)
    buf = oiio.ImageBuf(oiio.ImageSpec(8, 8, 3, oiio.HALF))
    buf.set_pixels(oiio.ROI(), linear)
    assert buf.write(str(tmp_path / "p.exr"))
    encoded = read_frame(tmp_path / "p.exr")                           # float plates are sRGB-encoded ...
    assert encoded.dtype == np.float32 and encoded[0, 0, 0] == pytest.approx(0.5, abs=2e-3)
    assert read_frame(tmp_path / "p.exr", "display")[0, 0, 0] == pytest.approx(0.214, abs=1e-3)  # ... unless told
    assert float(linear_to_srgb(np.float32(1.0))) == pytest.approx(1.0)
    with pytest.raises(SourceError, match="cannot read"):
        read_frame(tmp_path / "missing.png")


def test_half_float_plates_are_read_as_half_and_give_the_float_path_s_frame(tmp_path):
    """A half EXR (the usual plate) is read as half and converted through the table of every half value: the very
    frame that the same values stored as float32 give, NaN, negatives and highlights included."""
    rng = np.random.default_rng(7)
    linear = rng.uniform(-0.1, 4.0, (24, 40, 3)).astype(np.float16)
    linear[0, 0] = [np.nan, np.inf, -np.inf]
    from shared import colour

    colour._half_table.cache_clear()
    frames = {}
    for name, kind in (("half", oiio.HALF), ("float", oiio.FLOAT)):
        buf = oiio.ImageBuf(oiio.ImageSpec(40, 24, 3, kind))
        buf.set_pixels(oiio.ROI(), linear.astype(np.float32))
        assert buf.write(str(tmp_path / f"{name}.exr"))
        frames[name] = {space: read_frame(tmp_path / f"{name}.exr", space) for space in ("auto", "display")}
    for space in ("auto", "display"):
        half, full = frames["half"][space], frames["float"][space]
        assert half.dtype == np.float32 and half.shape == (24, 40, 3) and np.array_equal(half, full), space
    assert np.allclose(frames["half"]["auto"][0, 0], [0.0, 1.0, 0.0], atol=1e-6)    # NaN, +inf, -inf
    assert 0.0 <= frames["half"]["auto"].min() and frames["half"]["auto"].max() <= 1.0
    assert colour._half_table.cache_info().currsize == 2            # the half file went through the tables


@pytest.mark.parametrize("name, expected", [("sRGB", "display"), ("Linear Rec.709", "linear"), ("ACEScg", "linear"),
                                            ("Non-Color", "auto"), ("AgX Base sRGB", "display")])
def test_blender_colour_spaces(name, expected):
    assert colorspace_from_blender(name) == expected


def test_autostart_command_listens_where_the_add_on_connects():
    settings = core_service.ServiceSettings("tcp://127.0.0.1:6001", "oavm serve --device cpu")
    assert settings.autostart_argv() == ["oavm", "serve", "--device", "cpu", "--endpoint", "tcp://127.0.0.1:6001"]
    assert core_service.ServiceSettings(autostart_command="oavm serve --endpoint tcp://x:1").autostart_argv()[-1] \
        == "tcp://x:1"
    assert core_service.ServiceSettings(autostart_command="  ").autostart_argv() is None


# ------------------------------------------------------------------------------------------------ the job
def _job(plates: Path, out: Path, clip_id: str, frames=range(1, FRAMES + 1), prompts=None) -> MatteJob:
    return MatteJob(clip_id=clip_id, frames=list(frames),
                    frame_paths={f: str(plates / f"plate_{f:04d}.png") for f in range(1, FRAMES + 1)},
                    prompts=prompts or {"disc": rect_mask()}, output_dir=str(out))


@pytest.fixture(scope="module")
def full_run(service, plates, tmp_path_factory):
    """One job over all frames (shared: each frame costs a model step); returns (result, progress, folder)."""
    folder = tmp_path_factory.mktemp("full_run")
    progress = []
    with OAVMClient(service, timeout_s=120) as client:
        result = run_job(client, _job(plates, folder, "core-full"), progress=progress.append)
    return result, progress, folder


def test_job_writes_the_services_mattes_for_every_frame(full_run, direct_rect):
    result, progress, folder = full_run
    assert result.written == list(range(1, FRAMES + 1)) and not result.cancelled
    assert [p.done for p in progress] == list(range(1, FRAMES + 1))
    assert sorted(os.listdir(folder)) == [f"matte.{f:04d}.exr" for f in range(1, FRAMES + 1)]
    for f in range(1, FRAMES + 1):
        written = read_matte_exr(matte_files(folder).path(f))
        assert list(written) == ["disc"]
        np.testing.assert_allclose(written["disc"], direct_rect[f]["disc"], atol=HALF_TOLERANCE)
    assert direct_rect[FRAMES]["disc"].max() > direct_rect[FRAMES]["disc"].min()   # a matte, not a constant


def test_mattes_written_behind_the_next_frame_are_the_same_files_in_order(full_run, service, plates, tmp_path,
                                                                         monkeypatch):
    """Where a core is free (a service on a GPU or another machine) each matte is written on a worker thread while
    the next plate is read and sent: the same mattes, progress in frame order and only for complete files."""
    from plugin_blender.core import job as core_job
    from shared.write_behind import core_is_free

    with OAVMClient(service, timeout_s=120) as client:
        assert not core_is_free(client.status(), client.endpoint)        # the tests' CPU service: written in turn
        writers, progress = [], []
        write = core_job.write_matte_exr

        def watched(path, layers, *, half):
            write(path, layers, half=half)
            writers.append(threading.current_thread().name)
        monkeypatch.setattr(core_job, "write_matte_exr", watched)

        def complete(p):
            assert os.path.isfile(matte_files(tmp_path).path(p.frame))   # reported once the file is there
            progress.append(p.frame)
        job = _job(plates, tmp_path, "core-behind")
        job.write_behind = True
        result = run_job(client, job, progress=complete)
    assert result.written == progress == list(range(1, FRAMES + 1)) and not result.cancelled
    assert len(writers) == FRAMES and all(name.startswith("oavm-write-behind") for name in writers)
    for f in range(1, FRAMES + 1):
        assert np.array_equal(read_matte_exr(matte_files(tmp_path).path(f))["disc"],
                              read_matte_exr(matte_files(full_run[2]).path(f))["disc"])


def test_cancel_keeps_the_complete_frames_already_written(service, plates, tmp_path):
    cancel = threading.Event()

    def stop_after_two(p):
        if p.done == 2:
            cancel.set()

    with OAVMClient(service, timeout_s=120) as client:
        result = run_job(client, _job(plates, tmp_path, "core-cancel", range(1, 4)), progress=stop_after_two,
                         cancel=cancel)
    assert result.cancelled and result.written == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["matte.0001.exr", "matte.0002.exr"]
    assert all(read_matte_exr(matte_files(tmp_path).path(f))["disc"].shape == (HEIGHT, WIDTH) for f in (1, 2))


def test_reprompt_rewrites_from_the_frame_on_and_keeps_the_frames_before(full_run, service, plates, tmp_path):
    shutil.copytree(full_run[2], tmp_path, dirs_exist_ok=True)
    before = {f: Path(matte_files(tmp_path).path(f)).read_bytes() for f in range(1, FRAMES + 1)}
    # the artist corrects the disc at frame 4 (moved 9 px right) and adds a second object
    corrected = {"disc": rect_mask(19, 43), "corner": rect_mask(0, 10, 0, 10)}
    prompts, lost = reprompt_prompts(existing_matte(str(tmp_path), 4), corrected)
    assert lost == [] and set(prompts) == {"disc", "corner"}
    crashed = {f: tmp_path / (".matte.%04d.exr.oavm-tmp-%d" % (f, 2 ** 22 + 1)) for f in (2, 5)}   # Blender died
    for path in crashed.values():
        path.write_bytes(b"half a matte")
    with OAVMClient(service, timeout_s=120) as client:
        result = run_job(client, _job(plates, tmp_path, "core-reprompt", range(4, FRAMES + 1), prompts))
    assert result.written == [4, 5, 6]
    assert not crashed[5].exists() and crashed[2].exists()      # the job's own frames only
    for f in (1, 2, 3):
        assert Path(matte_files(tmp_path).path(f)).read_bytes() == before[f]
    expected = direct_mattes(service, plates, "core-reprompt-direct", [4, 5, 6], prompts)
    for f in (4, 5, 6):
        written = read_matte_exr(matte_files(tmp_path).path(f))
        assert set(written) == {"disc", "corner"}
        for obj in written:
            np.testing.assert_allclose(written[obj], expected[f][obj], atol=HALF_TOLERANCE)
    with pytest.raises(OAVMBlenderError, match="no matte of frame 9"):
        existing_matte(str(tmp_path), 9)


def test_reprompt_keeps_other_objects_from_their_own_matte():
    existing = {"a": np.array([[0.9, 0.2]]), "b": np.array([[0.1, 0.3]]), "c": np.array([[0.0, 0.7]])}
    prompts, lost = reprompt_prompts(existing, {"c": np.array([[1.0, 0.0]])})
    assert prompts["a"].tolist() == [[1, 0]] and prompts["c"].tolist() == [[1, 0]] and lost == ["b"]


def test_mask_of_the_wrong_size_is_refused_before_anything_is_sent(plates, tmp_path):
    job = _job(plates, tmp_path, "core-size", prompts={"m": np.ones((24, 32), np.float32)})
    with pytest.raises(MaskError, match="is 32x24 but the clip is 64x48"):
        run_job(object(), job)              # a client that would fail on any call: it is never reached
    assert os.listdir(tmp_path) == []


def test_frames_with_gaps_are_refused_before_anything_is_sent(plates, tmp_path):
    """The job streams frames as first, first + 1, ...: a range with a step would label plates wrongly."""
    with pytest.raises(OAVMBlenderError, match="without a step"):
        run_job(object(), _job(plates, tmp_path, "core-gap", frames=[1, 3, 5]))
    assert os.listdir(tmp_path) == []


def test_service_down_is_reported_with_what_to_do_and_writes_nothing(plates, tmp_path):
    settings = core_service.ServiceSettings(f"tcp://127.0.0.1:{free_port()}", autostart_command="", timeout_s=2,
                                            retries=0)
    out = tmp_path / "mattes"
    started = time.monotonic()
    client = core_service.connect(settings)
    try:
        with pytest.raises(OAVMServiceUnavailable) as caught:
            run_job(client, _job(plates, out, "core-down"))
    finally:
        client.close()
    assert time.monotonic() - started < 20
    message = core_service.describe_error(caught.value, settings)
    assert "not reachable" in message and "Preferences" in message and "no autostart command" in message
    assert not out.exists()


def test_job_thread_reports_progress_then_done(service, plates, tmp_path):
    settings = core_service.ServiceSettings(service, autostart_command="", timeout_s=120)
    thread = JobThread(_job(plates, tmp_path, "core-thread", range(1, 4)), lambda: core_service.connect(settings),
                       lambda exc: core_service.describe_error(exc, settings)).start()
    events = []
    deadline = time.monotonic() + 120
    while not thread.finished and time.monotonic() < deadline:
        events += thread.poll()
        time.sleep(0.05)
    assert [e.kind for e in events] == ["progress"] * 3 + ["done"]
    assert events[-1].payload.written == [1, 2, 3] and thread.join(5)


def test_job_thread_turns_failures_into_a_message(plates, tmp_path):
    settings = core_service.ServiceSettings(f"tcp://127.0.0.1:{free_port()}", autostart_command="", timeout_s=1,
                                            retries=0)
    thread = JobThread(_job(plates, tmp_path, "core-thread-down"), lambda: core_service.connect(settings),
                       lambda exc: core_service.describe_error(exc, settings)).start()
    assert thread.join(30)
    (event,) = thread.poll()
    assert event.kind == "error" and "not reachable" in event.payload and thread.finished
