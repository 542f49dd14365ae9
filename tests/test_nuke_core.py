# SPDX-License-Identifier: GPL-3.0-or-later
"""The Nuke gizmo's host-free core (plugin_nuke/oavm_nuke): frame ranges, clip ids, cache paths and validation,
the EXR reader/writer, and the request loop against a real OAVM service on loopback.

Frames are real EXR files written with OpenImageIO (as Nuke's Write node would: ZIP compression, half floats, a
render-time header attribute that changes on every render); the service is the real one with a tiny checkpoint.
"""
from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin_nuke"))

from oavm_nuke import exr  # noqa: E402
from oavm_nuke.analysis import (AnalysisError, AnalysisSettings, Analyzer, FrameSource, PrintProgress,  # noqa: E402
                                Progress, checkpoint_identity, is_local_endpoint)
from oavm_nuke.cache import (CacheError, CacheLayout, Manifest, cache_status, chain_key,  # noqa: E402
                             resolve_cache_dir, root_key)
from oavm_nuke.clipid import ClipIdError, default_clip_id, validate_clip_id  # noqa: E402
from oavm_nuke.frameranges import FrameRangeError, compact, parse_frame_ranges  # noqa: E402
from oavm_nuke.frames import linear_to_display, load_mask, load_source, source_digest  # noqa: E402

from oavm_service.io.colour import InputColorspace, to_network_rgb  # noqa: E402
from shared.client import OAVMClient  # noqa: E402
from shared.files import temporary_path  # noqa: E402
from shared.protocol import ErrorCode, OAVMServiceError  # noqa: E402
from tests.helpers.live_service import live_service  # noqa: E402


# ------------------------------------------------------------------------------------------------ frame ranges

@pytest.mark.parametrize("text, frames", [
    # the table of "Defining Frame Ranges" in the Nuke user guide
    ("3", [3]), ("-3", [-3]), ("1 3 4 8", [1, 3, 4, 8]), ("1-10", list(range(1, 11))),
    ("-3-4", list(range(-3, 5))), ("-8--5", [-8, -7, -6, -5]), ("1-10x2", [1, 3, 5, 7, 9]),
    ("1-10x3", [1, 4, 7, 10]), ("1-4x1 8-10x1 12-14x1", [1, 2, 3, 4, 8, 9, 10, 12, 13, 14]),
    # and what the gizmo adds: backwards runs, commas
    ("1005-1001", [1005, 1004, 1003, 1002, 1001]), ("10-1x4", [10, 6, 2]), ("1-3, 7", [1, 2, 3, 7]),
])
def test_frame_ranges_read_like_nuke(text, frames):
    ranges = parse_frame_ranges(text)
    assert ranges.frames() == frames
    assert parse_frame_ranges(str(ranges)).frames() == frames        # str() gives Nuke syntax back
    assert compact(frames).frames() == frames


@pytest.mark.parametrize("text, says", [
    ("", "empty"), ("1-", "cannot read"), ("a-b", "cannot read"), ("1-10y2", "cannot read"),
    ("1-10x0", "step must be 1 or more"), ("1-5 3-7", "frame 3 appears twice"),
])
def test_bad_frame_ranges_say_what_to_type(text, says):
    with pytest.raises(FrameRangeError, match=says) as info:
        parse_frame_ranges(text)
    assert "1001-1100" in str(info.value) or "twice" in str(info.value)


def test_compact_finds_steps_and_runs():
    assert str(compact([1, 2, 3, 7, 9, 11, 20, 21])) == "1-3 7-11x2 20-21"
    assert str(compact([5])) == "5"
    assert str(compact([1, 3])) == "1 3"          # a lone jump is not a stepped range


# ------------------------------------------------------------------------------------------------ clip id, paths

def test_clip_id_is_stable_distinct_and_safe(tmp_path):
    a = default_clip_id(str(tmp_path / "shot 010" / "comp_v001.nk"), "Group1.OAVM1")
    assert a == default_clip_id(str(tmp_path / "shot 010" / "comp_v001.nk"), "Group1.OAVM1")
    assert a.startswith("comp_v001.Group1.OAVM1-") and validate_clip_id(a) == a
    b = default_clip_id(str(tmp_path / "shot 020" / "comp_v001.nk"), "Group1.OAVM1")
    assert a != b                                   # same script name in another shot folder
    assert default_clip_id("Root", "OAVM1").startswith("untitled.OAVM1-")
    for bad in ("", "../x", "a/b", "x" * 200, ".hidden"):
        with pytest.raises(ClipIdError, match="clear the knob"):
            validate_clip_id(bad)


def test_cache_folder_is_beside_the_script_unless_chosen(tmp_path):
    script = tmp_path / "shots" / "comp.nk"
    assert resolve_cache_dir("", str(script)) == (tmp_path / "shots" / "oavm_cache").as_posix()
    assert resolve_cache_dir(str(tmp_path / "c"), str(script)) == (tmp_path / "c").as_posix()
    with pytest.raises(CacheError, match="save the script"):
        resolve_cache_dir("", "Root")
    layout = CacheLayout.for_clip("", str(script), "clipA")
    assert layout.matte(1001) == (tmp_path / "shots" / "oavm_cache" / "clipA" / "matte.1001.exr").as_posix()
    assert layout.matte_pattern.endswith("clipA/matte.%04d.exr")
    assert layout.source(-5).endswith("input/source.-005.exr")   # printf, as Nuke pads negative frames


# ------------------------------------------------------------------------------------------------ EXR

def _oiio_write(path, planes: dict, *, compression="zips", pixel="half", origin=(0, 0), full=None, stamp=True):
    names = sorted(planes)
    h, w = planes[names[0]].shape
    spec = oiio.ImageSpec(w, h, len(names), pixel)
    spec.channelnames = tuple(names)
    spec.attribute("compression", compression)
    spec.x, spec.y = origin
    if full:
        spec.full_x, spec.full_y, spec.full_width, spec.full_height = full
    if stamp:   # Nuke stamps every render; the cache must not care
        spec.attribute("nuke/renderTime", str(time.time_ns()))
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), spec), oiio.geterror()
    out.write_image(np.stack([planes[n] for n in names], axis=-1).astype(np.float32))
    out.close()


def _oiio_read(path) -> dict:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    px = inp.read_image(0, 0, 0, spec.nchannels, "float")
    inp.close()
    return {n: px[..., i] for i, n in enumerate(spec.channelnames)}


@pytest.mark.parametrize("compression", [exr.NONE, exr.ZIPS, exr.ZIP])
@pytest.mark.parametrize("pixel_type", [exr.HALF, exr.FLOAT])
@pytest.mark.parametrize("shape", [(37, 53), (301, 517)])   # the larger: 19 ZIP chunks, deflated on several threads
def test_written_exr_reads_back_in_openimageio(tmp_path, compression, pixel_type, shape):
    rng = np.random.default_rng(1)
    noise = rng.random(shape, dtype=np.float32)
    noise[: shape[0] // 2] = 0.25          # flat lines deflate; float noise does not shrink and is stored raw
    planes = {"A": noise, "G": np.linspace(0, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape)}
    exr.write_exr(str(tmp_path / "m.exr"), planes, pixel_type=pixel_type, compression=compression)
    back = _oiio_read(tmp_path / "m.exr")
    tol = 1e-3 if pixel_type == exr.HALF else 0
    for name, plane in planes.items():
        assert np.abs(back[name] - plane).max() <= tol
    ours = exr.read_exr(str(tmp_path / "m.exr"))
    assert ours.compression == compression and np.abs(ours.channels["A"] - planes["A"]).max() <= tol


@pytest.mark.parametrize("compression, code", [("none", exr.NONE), ("zips", exr.ZIPS), ("zip", exr.ZIP)])
def test_reads_openimageio_files_with_overscan(tmp_path, compression, code):
    rng = np.random.default_rng(2)
    rgb = {c: rng.random((30, 44), dtype=np.float32) for c in "RGB"}
    # data window 4 px left of and 2 px below the 40x34 format, as Nuke writes an overscan bounding box
    _oiio_write(tmp_path / "o.exr", rgb, compression=compression, pixel="float", origin=(-4, 6), full=(0, 0, 40, 34))
    image = exr.read_exr(str(tmp_path / "o.exr"))
    assert image.compression == code and image.data_window == (-4, 6, 39, 35)
    shown = image.in_display_window()
    assert shown.channels["R"].shape == (34, 40)
    assert np.array_equal(shown.channels["R"][6:34, 0:40], rgb["R"][0:28, 4:44])
    assert not shown.channels["R"][:6].any()       # below the data window: black


def test_unreadable_exr_says_which_write_setting_to_use(tmp_path):
    _oiio_write(tmp_path / "p.exr", {"R": np.zeros((8, 8), np.float32)}, compression="piz")
    with pytest.raises(exr.ExrError, match="Zip \\(1 scanline\\)"):
        exr.read_exr(str(tmp_path / "p.exr"))
    (tmp_path / "j.exr").write_bytes(b"\xff\xd8\xff\xe0 not an exr")
    with pytest.raises(exr.ExrError, match="file type to exr"):
        exr.read_exr(str(tmp_path / "j.exr"))


def test_source_colour_matches_what_the_service_does_with_a_file(tmp_path):
    rng = np.random.default_rng(3)
    linear = (rng.random((16, 16, 3)) * 1.5).astype(np.float32)
    linear[0, 0, 0] = np.nan
    _oiio_write(tmp_path / "s.exr", {c: linear[..., i] for i, c in enumerate("RGB")}, pixel="float")
    frame = load_source(str(tmp_path / "s.exr"))
    expected = to_network_rgb(linear, InputColorspace.LINEAR)        # the service's own conversion
    assert np.abs(frame.display - expected).max() < 1e-6
    assert frame.full_window
    assert np.allclose(linear_to_display(np.array([0.0, 0.0031308, 0.18, 1.0, 4.0])),
                       [0.0, 0.0404, 0.4614, 1.0, 1.0], atol=1e-4)
    # a half render (what the gizmo's Write nodes make) is kept half and goes through the curve's table: the same
    # frame as the service's float32 conversion of those values
    _oiio_write(tmp_path / "h.exr", {c: linear[..., i] for i, c in enumerate("RGB")}, pixel="half")
    half = load_source(str(tmp_path / "h.exr"))
    assert half.linear.dtype == np.float16
    expected = to_network_rgb(linear.astype(np.float16).astype(np.float32), InputColorspace.LINEAR)
    assert half.display.dtype == np.float32 and np.array_equal(half.display, expected)


def _chunks_reversed_in_file(src, dst):
    """The same EXR with its chunks placed last-to-first (the offset table still lists them by line), as a
    multi-threaded writer may place them."""
    data = open(src, "rb").read()
    layout = exr._layout(str(src))
    table_at = layout.table_at
    offsets = list(struct.unpack_from("<%dQ" % layout.n_chunks, data, table_at))
    ends = offsets[1:] + [len(data)]
    chunks = [data[a:b] for a, b in zip(offsets, ends)]
    body, new_offsets, at = b"", [], table_at + 8 * len(chunks)
    for chunk in reversed(chunks):
        new_offsets.insert(0, at)
        body += chunk
        at += len(chunk)
    open(dst, "wb").write(data[:table_at] + struct.pack("<%dQ" % len(chunks), *new_offsets) + body)
    return len(chunks)


def test_source_digest_follows_the_stored_pixels_not_the_render_stamp(tmp_path, monkeypatch):
    """A Source frame's part of the cache key: the same for the same render stamped at another time and for its
    chunks placed in another order; different for another pixel, bounding box or compression; never decodes."""
    rng = np.random.default_rng(5)
    rgb = {c: rng.random((40, 50), dtype=np.float32) for c in "RGB"}
    paths = {}

    def render(name, planes=rgb, **kw):
        paths[name] = str(tmp_path / ("%s.exr" % name))
        _oiio_write(paths[name], planes, compression=kw.pop("compression", "zip"), **kw)
        return source_digest(paths[name])

    with monkeypatch.context() as m:                       # keying inflates no chunk
        m.setattr(exr, "_unzip", lambda *a: pytest.fail("source_digest decoded a chunk"))
        first, full = render("first")
        assert full and len(first) == 64
        time.sleep(0.01)
        assert render("again") == (first, True)            # another render time stamped into the header
    assert open(paths["first"], "rb").read() != open(paths["again"], "rb").read()
    assert _chunks_reversed_in_file(paths["first"], tmp_path / "reversed.exr") == 3      # 40 lines: 3 chunks
    assert source_digest(str(tmp_path / "reversed.exr")) == (first, True)
    assert np.array_equal(exr.read_exr(str(tmp_path / "reversed.exr")).channels["G"],
                          exr.read_exr(paths["first"]).channels["G"])
    edited = {**rgb, "G": rgb["G"].copy()}
    edited["G"][39, 49] += 0.01                            # one pixel of the last chunk
    assert render("edited", edited)[0] != first
    assert render("overscan", origin=(-2, 0), full=(0, 0, 48, 40))[1] is False
    assert render("zips", compression="zips")[0] != first      # a re-analysis, never a stale matte
    assert load_source(paths["first"]).digest == first      # frames sent as pixels get the same key
    truncated = tmp_path / "truncated.exr"
    truncated.write_bytes(open(paths["first"], "rb").read()[:-100])
    with pytest.raises(exr.ExrError, match="truncated.*render it again"):
        source_digest(str(truncated))
    with pytest.raises(exr.ExrError, match="Source render .* is missing"):
        source_digest(str(tmp_path / "never_rendered.exr"))


def test_empty_mask_is_refused_with_what_to_draw(tmp_path):
    _oiio_write(tmp_path / "m.exr", {"A": np.zeros((8, 8), np.float32)})
    with pytest.raises(exr.ExrError, match="Mask input is empty"):
        load_mask(str(tmp_path / "m.exr"))


# ------------------------------------------------------------------------------------------------ cache records

def test_manifest_round_trip_and_reset(tmp_path):
    layout = CacheLayout(str(tmp_path / "c"))
    layout.make_dirs()
    exr.write_exr(layout.matte(7), {"A": np.ones((4, 4), np.float32)})
    m = Manifest("clip", root="r1")
    m.record_matte(7, 0, "k0", layout.matte(7))
    m.prompts[7] = "p"
    m.save(layout.manifest)
    back = Manifest.load(layout.manifest, "clip")
    assert back.frames == m.frames and back.prompts == {7: "p"} and back.root == "r1"
    assert back.matte_valid(7, 0, "k0", layout.matte(7))
    assert not back.matte_valid(7, 0, "other key", layout.matte(7))
    assert not back.matte_valid(7, 1, "k0", layout.matte(7))            # same frame, another position
    assert Manifest.load(layout.manifest, "another clip").frames == {}   # someone else's manifest: ignored
    (tmp_path / "c" / "manifest.json").write_text("{ not json")
    assert Manifest.load(layout.manifest, "clip").frames == {}
    back.reset("r2")
    assert back.frames == {} and back.prompts == {7: "p"}              # prompts are inputs, they stay
    assert chain_key("a", "b", None) != chain_key("a", "b", "c") != chain_key("a", "x", "c")
    assert root_key("ck1", "fg", None) != root_key("ck2", "fg", None) != root_key("ck1", "fg", 0.5)


def test_endpoint_locality_and_checkpoint_identity():
    assert is_local_endpoint("tcp://127.0.0.1:5590") and is_local_endpoint("tcp://localhost:1")
    assert is_local_endpoint("ipc:///tmp/oavm") and not is_local_endpoint("tcp://10.0.0.5:5590")
    assert checkpoint_identity({"checkpoint": {"sha256": "abc", "path": "x"}}) == "abc"


# ------------------------------------------------------------------------------------------------ live service

SIZE = (48, 64)           # small frames: the tiny checkpoint on 2 shared CPU cores
FRAMES = list(range(1001, 1005))


class OiioFrameSource(FrameSource):
    """Renders like the gizmo's Write nodes would, with OpenImageIO: scene-linear RGB and an alpha mask."""

    def __init__(self, clip, masks, *, frames=FRAMES):
        self.rgb = {f: clip[i] for i, f in enumerate(frames)}
        self.masks = dict(masks)
        self.prepared, self.masks_rendered = [], []

    def prepare(self, frames, layout):
        for f in frames:
            if not os.path.isfile(layout.source(f)):
                self.prepared.append(f)
                _oiio_write(layout.source(f), {c: self.rgb[f][..., i] for i, c in enumerate("RGB")})

    def render_mask(self, frame, layout):
        self.masks_rendered.append(frame)
        _oiio_write(layout.prompt(frame), {"A": self.masks[frame]})


class CancelAfter(Progress):
    def __init__(self, n):
        self.n, self.calls, self.messages = n, 0, []

    def update(self, done, total, message):
        self.messages.append(message)

    def cancelled(self):
        self.calls += 1
        return self.calls > self.n


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers.live_service import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("nuke_core_ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def service(tmp_path_factory, checkpoint):
    with live_service(tmp_path_factory.mktemp("nuke_core_service"), checkpoint=checkpoint) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The same checkpoint in this process: the reference the gizmo's cache must equal bit for bit."""
    from oavm_service.engine import Engine
    return Engine.from_checkpoint(checkpoint, device="cpu", precision="fp32")


@pytest.fixture
def client(service):
    c = OAVMClient(service, timeout_s=120, retries=0)
    yield c
    c.close()


@pytest.fixture
def clip(make_clip):
    frames, alphas = make_clip(frames=len(FRAMES), height=SIZE[0], width=SIZE[1], seed=4)
    return frames, alphas


def _settings(tmp_path, clip_id, **kw):
    kw = {"frames": FRAMES, "chunk": 2, "state_every": 2, "matte_pixel_type": exr.FLOAT, **kw}
    return AnalysisSettings(clip_id=clip_id, layout=CacheLayout(str(tmp_path / "cache" / clip_id)), **kw)


def _cached(layout, frames=FRAMES):
    """(alpha, fgmask) stacks read back from the cache with OpenImageIO."""
    planes = [_oiio_read(layout.matte(f)) for f in frames]
    return np.stack([p["A"] for p in planes]), np.stack([p["G"] for p in planes])


def _half(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)   # what a half EXR render holds


def _reference(engine, linear, mask, corrections=None):
    """The same clip stepped through the engine by hand, from the half-float renders the service reads."""
    corrections = corrections or {}
    session = engine.new_session()
    display = [to_network_rgb(_half(f), InputColorspace.LINEAR) for f in linear]
    out = [session.step(display[0], {"fg": _half(mask)})["fg"]]
    for i in range(1, len(display)):
        out.append(session.reprompt("fg", display[i], _half(corrections[i]))["fg"] if i in corrections
                   else session.step(display[i])["fg"])
    return np.stack([m.alpha for m in out]), np.stack([m.fgmask for m in out])


def _same(cached, reference):
    diffs = [float(np.abs(c - r).max()) for c, r in zip(cached, reference)]
    print("max |cache - reference| (alpha, fgmask):", diffs)
    return all(d <= 1e-6 for d in diffs)     # float noise between two processes (thread counts), no more


def test_analysis_writes_the_mattes_the_service_computes(tmp_path, client, engine, clip):
    linear, alphas = clip
    source = OiioFrameSource(linear, {FRAMES[0]: alphas[0]})
    lines = []
    report = Analyzer(client, _settings(tmp_path, "full"), source, PrintProgress(write=lines.append)).run()
    assert (report.computed, report.reused, report.cancelled, report.resumed_from) == (4, 0, False, "start")
    assert lines[-1].startswith("[oavm] 100% frame 1004 (4/4)")
    layout = _settings(tmp_path, "full").layout
    cached = _cached(layout)
    assert cached[0].shape == (4,) + SIZE
    assert _same(cached, _reference(engine, linear, alphas[0]))       # matte_file path, bit for bit
    fg = _oiio_read(layout.matte(1003))
    assert set(fg) == {"A", "G", "R"} and np.array_equal(fg["A"], fg["R"])
    assert not any(Path(layout.root, "input").iterdir())              # Source renders are temporary
    assert cache_status(layout, "full", FRAMES).complete

    # Nothing changed: nothing is sent for matting, every file stays as it was.
    mtimes = [os.stat(layout.matte(f)).st_mtime_ns for f in FRAMES]
    again = Analyzer(client, _settings(tmp_path, "full"), OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert (again.computed, again.reused) == (0, 4) and "up to date" in again.describe()
    assert [os.stat(layout.matte(f)).st_mtime_ns for f in FRAMES] == mtimes


def test_pixels_for_a_remote_service_give_the_same_mattes(tmp_path, client, engine, clip):
    linear, alphas = clip
    report = Analyzer(client, _settings(tmp_path, "pixels", local=False),
                      OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert report.computed == 4
    assert _same(_cached(_settings(tmp_path, "pixels").layout), _reference(engine, linear, alphas[0]))


def test_a_half_float_cache_gets_half_float_mattes_that_match_the_service(tmp_path, client, engine, clip):
    """The default cache precision (half): the service sends half floats (half the bytes back), which is what the
    cache stores; the files hold the engine's mattes rounded to half."""
    linear, alphas = clip
    settings = _settings(tmp_path, "half", matte_pixel_type=exr.HALF)
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert report.computed == 4
    held = {c["clip_id"]: c for c in client.status()["clips"]}
    assert held["half"]["reply_dtype"] == "float16"
    for cached, reference in zip(_cached(settings.layout), _reference(engine, linear, alphas[0])):
        assert float(np.abs(cached - _half(reference)).max()) <= 1e-3     # at most a half-float step apart
        assert np.array_equal(cached, _half(cached))                      # and half floats in the file


def test_edited_plate_reanalyses_from_the_edit_using_a_saved_state(tmp_path, client, engine, clip):
    linear, alphas = clip
    settings = _settings(tmp_path, "edit")
    Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    before = _cached(settings.layout)
    edited = linear.copy()
    edited[3] = edited[3][:, ::-1]                    # the artist changed the plate at frame 1004
    report = Analyzer(client, settings, OiioFrameSource(edited, {FRAMES[0]: alphas[0]})).run()
    assert (report.reused, report.computed, report.first_computed) == (3, 1, 1004)
    assert report.resumed_from == "saved state at frame 1002" and report.replayed == 1   # state every 2 frames
    after = _cached(settings.layout)
    assert np.array_equal(after[1][:3], before[1][:3])
    assert _same(after, _reference(engine, edited, alphas[0]))


def test_reprompt_keeps_earlier_frames_and_matches_a_direct_reprompt(tmp_path, client, engine, clip):
    linear, alphas = clip
    correction = np.zeros(SIZE, np.float32)
    correction[10:30, 20:40] = 1.0                   # a deliberately different mask at frame 1003
    settings = _settings(tmp_path, "fix", state_every=0)
    source = OiioFrameSource(linear, {FRAMES[0]: alphas[0], 1003: correction})
    Analyzer(client, settings, source).run()
    before = _cached(settings.layout)
    analyzer = Analyzer(client, settings, source)
    analyzer.add_correction(1003)
    assert analyzer.corrections == [1003]
    report = analyzer.run()
    assert (report.reused, report.computed, report.replayed) == (2, 2, 2)
    assert report.resumed_from == "replay from the first frame"
    after = _cached(settings.layout)
    assert np.array_equal(after[1][:2], before[1][:2])                  # kept, not rewritten
    changed = max(np.abs(after[k][2] - before[k][2]).max() for k in (0, 1))
    print("largest change made by the re-prompt at frame 1003:", changed)
    assert changed > 1e-5               # the tiny random model reacts little, but clearly above 1e-6
    assert _same(after, _reference(engine, linear, alphas[0], corrections={2: correction}))
    with pytest.raises(AnalysisError, match="outside the analysed range"):
        analyzer.add_correction(2000)
    analyzer.clear_corrections()
    assert Analyzer(client, settings, source).run().first_computed == 1003   # back to no correction
    assert _same(_cached(settings.layout), _reference(engine, linear, alphas[0]))


def test_cancel_keeps_what_was_written_and_resumes_in_the_live_session(tmp_path, client, engine, clip):
    linear, alphas = clip
    settings = _settings(tmp_path, "cancel")
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]}), CancelAfter(2)).run()
    assert report.cancelled and report.computed == 2 and "cancelled" in report.describe()
    status = cache_status(settings.layout, "cancel", FRAMES)
    assert status.cached == 2 and "missing 1003-1004" in status.describe()
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert (report.reused, report.computed, report.resumed_from) == (2, 2, "live session")
    assert _same(_cached(settings.layout), _reference(engine, linear, alphas[0]))


def test_mattes_written_behind_the_next_request_are_the_same_and_recorded_only_when_complete(
        tmp_path, client, engine, clip, monkeypatch):
    """Where a core is free (a service on a GPU or another machine) each cache matte is written on a worker thread
    while the service mattes the next frame: the same files; a write that fails stops the analysis with its
    error, and only completely written mattes are recorded, so the next run redoes the rest."""
    import threading

    from oavm_nuke import analysis
    from shared.write_behind import core_is_free

    assert core_is_free({"device": "cuda:0"}, "tcp://127.0.0.1:5555")
    assert core_is_free({"device": "cpu"}, "tcp://render-node-7:5555")
    assert not core_is_free({"device": "cpu"}, "ipc:///tmp/oavm.sock")
    assert not core_is_free(client.status(), client.endpoint)      # the tests' CPU service: written in turn

    linear, alphas = clip
    write_matte, writers, fail_at = analysis.write_matte, [], []

    def watched(path, *args):
        if any(path.endswith(".%04d.exr" % f) for f in fail_at):
            raise OSError(28, "No space left on device")
        write_matte(path, *args)
        writers.append(threading.current_thread().name)
    monkeypatch.setattr(analysis, "write_matte", watched)

    settings = _settings(tmp_path, "behind", write_behind=True)
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert report.computed == 4 and len(writers) == 4
    assert all(name.startswith("oavm-write-behind") for name in writers)
    assert _same(_cached(settings.layout), _reference(engine, linear, alphas[0]))
    assert cache_status(settings.layout, "behind", FRAMES).complete

    fail_at.append(1003)
    settings = _settings(tmp_path, "full-disk", write_behind=True)
    with pytest.raises(OSError, match="No space left"):
        Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert cache_status(settings.layout, "full-disk", FRAMES).missing == [1003, 1004]
    fail_at.clear()
    crashed = [temporary_path(settings.layout.matte(1003)), temporary_path(settings.layout.manifest)]
    crashed = [p.with_name(p.name.rsplit("-", 1)[0] + "-%d" % (2 ** 22 + 1)) for p in crashed]   # a Nuke that died
    for path in crashed:
        path.write_bytes(b"half a file")
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert (report.reused, report.computed) == (2, 2)
    assert not any(path.exists() for path in crashed)
    assert _same(_cached(settings.layout), _reference(engine, linear, alphas[0]))

    settings = _settings(tmp_path, "behind-cancel", write_behind=True)
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]}), CancelAfter(2)).run()
    assert report.cancelled and report.computed == 2
    assert cache_status(settings.layout, "behind-cancel", FRAMES).cached == 2    # both writes finished first


def test_lost_service_session_is_rebuilt(tmp_path, client, engine, clip):
    linear, alphas = clip
    settings = _settings(tmp_path, "lost", state_every=0)
    Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]}), CancelAfter(2)).run()
    client.close_clip("lost")                        # the service restarted, or evicted the clip
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert report.computed == 2 and report.resumed_from == "replay from the first frame"
    assert _same(_cached(settings.layout), _reference(engine, linear, alphas[0]))


def test_damaged_matte_is_redone(tmp_path, client, clip):
    linear, alphas = clip
    settings = _settings(tmp_path, "damaged")
    Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    with open(settings.layout.matte(1003), "r+b") as f:
        f.truncate(100)
    assert cache_status(settings.layout, "damaged", FRAMES).missing == [1003]
    report = Analyzer(client, settings, OiioFrameSource(linear, {FRAMES[0]: alphas[0]})).run()
    assert (report.reused, report.computed, report.resumed_from) == (2, 2, "saved state at frame 1002")
    assert cache_status(settings.layout, "damaged", FRAMES).complete


def test_stepped_and_backward_ranges_use_the_service_frame_order(tmp_path, client, engine, clip):
    linear, alphas = clip
    frames = parse_frame_ranges("1004-1001x2").frames()        # 1004, 1002
    settings = _settings(tmp_path, "back", frames=frames)
    report = Analyzer(client, settings, OiioFrameSource(linear, {1004: alphas[3]})).run()
    assert report.computed == 2
    assert _same(_cached(settings.layout, frames), _reference(engine, [linear[3], linear[1]], alphas[3]))


def test_service_errors_reach_the_caller(tmp_path, client, clip):
    linear, alphas = clip
    source = OiioFrameSource(linear, {FRAMES[0]: np.zeros(SIZE, np.float32)})
    with pytest.raises(exr.ExrError, match="Mask input is empty"):
        Analyzer(client, _settings(tmp_path, "nomask"), source).run()
    with pytest.raises(AnalysisError, match="empty"):
        _settings(tmp_path, "x", frames=[])
    with pytest.raises(OAVMServiceError) as info:
        client.matte("never-opened", 0, np.zeros(SIZE + (3,), np.float32))
    assert info.value.code == ErrorCode.UNKNOWN_CLIP
