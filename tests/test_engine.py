# SPDX-License-Identifier: GPL-3.0-or-later
"""The streaming engine: equals the batch path, restores exactly, stays flat in memory, handles many objects and
refuses bad input with OAVMInputError."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from oavm_service.checkpoint import save_checkpoint
from oavm_service.engine import ClipSession, Engine, Matte, auto_downsample_ratio
from oavm_service.errors import OAVMInputError


@pytest.fixture
def engine(tiny_model) -> Engine:
    return Engine(tiny_model, device="cpu", precision="fp32")


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[y0:y1, x0:x1] = 1.0
    return m


def _assert_mattes_equal(a: dict[str, Matte], b: dict[str, Matte], atol: float = 0.0) -> None:
    assert list(a) == list(b)
    for k in a:
        for field in ("alpha", "fgmask", "foreground"):
            np.testing.assert_allclose(getattr(a[k], field), getattr(b[k], field), rtol=0, atol=atol,
                                       err_msg=f"{k}.{field}")


@pytest.mark.parametrize("size, ratio", [((64, 96), 1.0), ((67, 101), 0.5)])
def test_streaming_equals_forward_clip(engine, make_clip, size, ratio):
    images, alphas = make_clip(4, *size, seed=5)
    mask = (alphas[0] > 0.5).astype(np.float32)
    session = engine.new_session(downsample_ratio=ratio)
    streamed = [session.step(images[0], {"obj": mask})] + [session.step(f) for f in images[1:]]
    with torch.inference_mode():
        batch = engine.model.forward_clip(torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0),
                                          torch.from_numpy(mask)[None, None], downsample_ratio=ratio)
    for t, mattes in enumerate(streamed):
        m = mattes["obj"]
        assert m.alpha.shape == size and m.fgmask.shape == size and m.foreground.shape == (*size, 3)
        assert m.alpha.dtype == np.float32 and m.foreground.dtype == np.float32
        np.testing.assert_allclose(m.alpha, batch["alpha"][0, t, 0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(m.fgmask, batch["fgmask"][0, t, 0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(m.foreground, batch["fgr"][0, t].permute(1, 2, 0).numpy(), atol=1e-4, rtol=0)
    assert session.frames_seen == 4 and session.frame_shape == size and session.object_ids == ["obj"]


def test_restored_session_continues_identically(engine, make_clip):
    images, alphas = make_clip(5, 48, 80, seed=7)
    session = engine.new_session()
    session.step(images[0], {"a": (alphas[0] > 0.5).astype(np.float32)})
    session.step(images[1])
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    restored = engine.new_session()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.frames_seen == 2 and restored.frame_shape == (48, 80) and restored.object_ids == ["a"]
    for frame in images[2:]:
        _assert_mattes_equal(session.step(frame), restored.step(frame))


def test_memory_is_flat_over_300_frames(make_clip):
    from conftest import calibrated_tiny_model

    engine = Engine(calibrated_tiny_model(), device="cpu", precision="fp32")
    images, alphas = make_clip(4, 144, 256, seed=9)
    assert auto_downsample_ratio(144, 256) == 1.0
    session = engine.new_session(downsample_ratio=0.5)  # network at 128x72 + refiner: same state, 4x cheaper
    session.step(images[0], {"a": (alphas[0] > 0.5).astype(np.float32)})
    session.step(images[1])
    held = session.held_tensors()
    reference = (len(held), sum(t.numel() * t.element_size() for t in held), session.memory_bytes())
    assert reference[2] > 0
    for i in range(2, 300):
        session.step(images[i % 4])
        held = session.held_tensors()
        now = (len(held), sum(t.numel() * t.element_size() for t in held), session.memory_bytes())
        assert now == reference, f"frame {i}: {now} != {reference}"
    assert session.frames_seen == 300


def test_multiple_objects_added_at_different_frames(engine, make_clip):
    images, alphas = make_clip(4, 64, 96, seed=11)
    a_mask = (alphas[0] > 0.5).astype(np.float32)
    b_mask = _box(64, 96, 5, 25, 60, 90)
    both = engine.new_session(downsample_ratio=1.0)
    alone = engine.new_session(downsample_ratio=1.0)
    out0 = both.step(images[0], {"a": a_mask})
    alone.step(images[0], {"a": a_mask})
    assert list(out0) == ["a"]
    both.step(images[1]), alone.step(images[1])
    out2 = both.add_object("b", images[2], b_mask)
    assert list(out2) == ["a", "b"] and both.object_ids == ["a", "b"]
    assert np.abs(out2["a"].alpha - out2["b"].alpha).mean() > 1e-4     # two different mattes
    # batching objects together does not change any object's result
    np.testing.assert_allclose(out2["a"].alpha, alone.step(images[2])["a"].alpha, atol=1e-5, rtol=0)
    out3 = both.step(images[3])
    np.testing.assert_allclose(out3["a"].alpha, alone.step(images[3])["a"].alpha, atol=1e-5, rtol=0)
    both.remove_object("a")
    assert list(both.step(images[0])) == ["b"]
    assert both.memory_bytes() == alone.memory_bytes()  # one object each, same frame size


def test_reprompt_replaces_the_objects_memory(engine, make_clip):
    images, alphas = make_clip(4, 48, 64, seed=13)
    session = engine.new_session(downsample_ratio=1.0)
    session.step(images[0], {"a": (alphas[0] > 0.5).astype(np.float32)})
    session.step(images[1])
    new_mask = _box(48, 64, 4, 30, 2, 30)
    fresh = engine.new_session(downsample_ratio=1.0)
    _assert_mattes_equal(session.reprompt("a", images[2], new_mask), fresh.step(images[2], {"a": new_mask}),
                         atol=1e-6)
    _assert_mattes_equal(session.step(images[3]), fresh.step(images[3]), atol=1e-6)


def test_frames_in_any_order_and_input_dtypes(engine, make_clip):
    images, alphas = make_clip(3, 40, 56, seed=17)
    mask = alphas[2] > 0.5                                   # bool mask
    session = engine.new_session(downsample_ratio=1.0)
    as_float = session.step(images[2], {"a": mask})          # a clip may start anywhere and run backwards
    for frame in (images[1], images[0]):
        session.step(frame)
    u8 = np.round(images[2] * 255).astype(np.uint8)
    u16 = (u8.astype(np.uint16) * 257)                       # same values on the 16-bit scale
    m8 = mask.astype(np.uint8) * 255
    r8 = engine.new_session(downsample_ratio=1.0).step(u8, {"a": m8})
    r16 = engine.new_session(downsample_ratio=1.0).step(u16, {"a": m8.astype(np.uint16) * 257})
    _assert_mattes_equal(r8, r16, atol=1e-6)
    assert np.abs(r8["a"].alpha - as_float["a"].alpha).max() < 0.05  # uint8 quantisation only
    half = engine.new_session(downsample_ratio=1.0).step(images[2].astype(np.float16), {"a": mask})
    assert np.isfinite(half["a"].alpha).all()


def test_odd_size_and_bf16_autocast(tiny_model):
    engine = Engine(tiny_model, device="cpu", precision="bf16")
    frame = np.random.default_rng(0).random((201, 333, 3), dtype=np.float32)
    out = engine.new_session().step(frame, {"x": _box(201, 333, 50, 150, 100, 250)})["x"]
    assert out.alpha.shape == (201, 333) and out.alpha.dtype == np.float32
    assert np.isfinite(out.alpha).all() and 0 <= out.alpha.min() and out.alpha.max() <= 1


def test_engine_from_checkpoint(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "t.safetensors", tiny_model, meta={"name": "t"})
    engine = Engine.from_checkpoint(path, device="cpu")
    assert engine.precision == "fp32" and engine.device.type == "cpu"
    info = engine.checkpoint_info
    assert info["path"] == str(path) and len(info["sha256"]) == 64 and info["config"] == tiny_model.config.to_dict()
    assert info["meta"] == {"name": "t"} and info["version"]


def _bad_inputs(h=32, w=48):
    frame = np.full((h, w, 3), 0.5, np.float32)
    mask = _box(h, w, 4, 20, 4, 20)
    nan = frame.copy()
    nan[3, 3, 1] = np.nan
    return [
        ("frame (H, W)", lambda s: s.step(frame[..., 0], {"a": mask}), "shape \\(H, W, 3\\)"),
        ("RGBA frame", lambda s: s.step(np.dstack([frame, frame[..., :1]]), {"a": mask}), "drop the alpha"),
        ("zero-size frame", lambda s: s.step(np.zeros((0, w, 3), np.float32), {"a": mask[:0]}), "empty"),
        ("NaN frame", lambda s: s.step(nan, {"a": mask}), "NaN"),
        ("int32 frame", lambda s: s.step(frame.astype(np.int32), {"a": mask}), "unsupported dtype int32"),
        ("list frame", lambda s: s.step(frame.tolist(), {"a": mask}), "numpy array"),
        ("mask size", lambda s: s.step(frame, {"a": mask[:-1]}), "resize the mask"),
        ("mask 3 channels", lambda s: s.step(frame, {"a": np.dstack([mask] * 3)}), "single-channel"),
        ("empty mask", lambda s: s.step(frame, {"a": np.zeros_like(mask)}), "empty \\(all zero\\)"),
        ("mask 0..255 float", lambda s: s.step(frame, {"a": mask * 255}), "divide 0..255"),
        ("NaN mask", lambda s: s.step(frame, {"a": np.where(mask > 0, np.nan, 0)}), "NaN"),
        ("no prompt", lambda s: s.step(frame), "needs at least one prompt"),
        ("bad id", lambda s: s.step(frame, {"": mask}), "non-empty strings"),
        ("unknown reprompt", lambda s: s.reprompt("zz", frame, mask), "unknown object 'zz'"),
        ("unknown remove", lambda s: s.remove_object("zz"), "unknown object 'zz'"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gives_a_clear_error(engine, case):
    _, call, message = _bad_inputs()[case]
    session = engine.new_session()
    with pytest.raises(OAVMInputError, match=message):
        call(session)
    assert session.frames_seen == 0 and session.object_ids == []


def test_errors_after_the_first_frame_leave_the_session_intact(engine):
    frame = np.full((32, 48, 3), 0.5, np.float32)
    mask = _box(32, 48, 4, 20, 4, 20)
    session = engine.new_session()
    first = session.step(frame, {"a": mask})
    before = session.state_dict()
    with pytest.raises(OAVMInputError, match="already exists"):
        session.add_object("a", frame, mask)
    with pytest.raises(OAVMInputError, match="start a new session"):
        session.step(np.full((40, 48, 3), 0.5, np.float32))
    with pytest.raises(OAVMInputError, match="empty"):
        session.step(frame, {"b": np.zeros((32, 48), np.float32)})
    after = session.state_dict()
    assert after["frames_seen"] == 1 and [o[0] for o in after["objects"]] == ["a"]
    for name, t in before["objects"][0][1].items():
        assert torch.equal(t, after["objects"][0][1][name]), name
    assert first["a"].alpha.shape == (32, 48)


def test_bad_engine_and_session_arguments(tiny_model, engine):
    with pytest.raises(OAVMInputError, match="downsample_ratio"):
        engine.new_session(downsample_ratio=1.5)
    with pytest.raises(OAVMInputError, match="unknown precision"):
        Engine(tiny_model, device="cpu", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(OAVMInputError, match="no CUDA GPU"):
            Engine(tiny_model, device="cuda")
    with pytest.raises(OAVMInputError, match="not an OAVM clip-session state"):
        engine.new_session().load_state_dict({"objects": []})
    assert isinstance(engine.new_session(), ClipSession)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_mattes_only_session_gives_the_same_alpha(engine, make_clip, ratio):
    """foreground=False skips the colour (and, downsampled, three of the refiner's four full-size channels)."""
    images, alphas = make_clip(3, 72, 120, seed=4)
    prompt = {"a": (alphas[0] > 0.5).astype(np.float32)}
    full = engine.new_session(downsample_ratio=ratio)
    mattes_only = engine.new_session(downsample_ratio=ratio, foreground=False)
    for i, frame in enumerate(images):
        want = full.step(frame, prompt if i == 0 else None)["a"]
        got = mattes_only.step(frame, prompt if i == 0 else None)["a"]
        assert want.foreground is not None and want.foreground.shape == (72, 120, 3)
        assert got.foreground is None
        np.testing.assert_allclose(got.alpha, want.alpha, atol=1e-5)
        np.testing.assert_allclose(got.fgmask, want.fgmask, atol=1e-6)
    assert 0.01 < want.alpha.mean() < 0.99  # a matte, not a constant


def test_read_only_frames_reach_the_device_without_a_warning_in_the_log():
    """A service's frames are read-only views (of a message, or of the client's shared memory): the engine copies
    them to the device without torch's "not writable" warning landing in the service log. In fresh interpreters
    with warnings as errors, because torch gives that warning once per process."""
    import subprocess
    import sys

    setup = "import numpy as np, torch; frame = np.zeros((16, 24, 3), np.uint8); frame.setflags(write=False)\n"
    engine = """
from oavm_service.engine import Engine
from oavm_service.model import OAVM, OAVMConfig
session = Engine(OAVM(OAVMConfig.tiny()), device="cpu").new_session()
assert torch.equal(session._to_device(frame), torch.zeros(16, 24, 3, dtype=torch.uint8))
"""

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", setup + code], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1])

    bare = run("torch.from_numpy(frame)")
    assert bare.returncode != 0 and "not writable" in bare.stderr     # what the engine keeps out of the log
    guarded = run(engine)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
