# SPDX-License-Identifier: GPL-3.0-or-later
"""CUDA graphs in the engine (Engine(cuda_graphs=True)) and the frame conversion on the device.

The tests marked ``cuda`` need a GPU: they ran on the lent H100 (docs/performance.md); without one they are
skipped. The CPU tests check the session's side of the graph path - when it records again, what it copies in and
out - with a recorder that replays eagerly but, like a CUDA graph, reads fixed input tensors and overwrites fixed
output tensors on every call, so a session that carried last frame's output state by reference would go wrong.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oavm_service import engine as engine_module
from oavm_service.engine import Engine, _to_unit_float, unit_frame
from oavm_service.errors import OAVMInputError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


class BufferReusingRecorder:
    """GraphedStep's contract without a GPU: fixed inputs, fixed outputs overwritten by every replay."""

    recorded = 0

    def __init__(self, step, frame, state, autocast):
        type(self).recorded += 1
        self.step = step
        self.frame = frame.clone()
        self.state = type(state)(**{k: t.clone() for k, t in state.tensors().items()})
        planes, nxt, finite = step(self.frame, self.state)   # on the CPU the output planes come unpacked
        self.outputs = ([p.clone() for p in planes], type(nxt)(**{k: t.clone() for k, t in nxt.tensors().items()}),
                        finite)

    def __call__(self, frame, state):
        self.frame.copy_(frame)
        for name, t in state.tensors().items():
            getattr(self.state, name).copy_(t)
        planes, nxt, finite = self.step(self.frame, self.state)
        for fixed, p in zip(self.outputs[0], planes):
            fixed.copy_(p)
        for name, t in nxt.tensors().items():
            getattr(self.outputs[1], name).copy_(t)
        return self.outputs


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.float32)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_graph_path_gives_the_eager_mattes_and_records_again_only_when_the_step_changes(tiny_model, make_clip,
                                                                                        monkeypatch):
    monkeypatch.setattr(engine_module, "GraphedStep", BufferReusingRecorder)
    BufferReusingRecorder.recorded = 0
    eager = Engine(tiny_model, device="cpu", precision="fp32")
    graphed = Engine(tiny_model, device="cpu", precision="fp32")
    graphed.cuda_graphs = True          # the CPU has no CUDA graphs: the recorder above stands in for them
    images, _ = make_clip(7, 48, 64, seed=3)
    images = (images * 255).astype(np.uint8)
    a, b = _box(48, 64, 8, 30, 10, 40), _box(48, 64, 20, 44, 30, 60)
    sessions = [e.new_session(downsample_ratio=0.5) for e in (eager, graphed)]
    script = [{"a": a}, None, None, {"b": b}, None, {"a": a}, None]     # prompts at frames 0, 3 (new), 5 (again)
    for t, prompts in enumerate(script):
        out = [s.step(images[t], prompts) for s in sessions]
        for obj in out[0]:
            for name in ("alpha", "fgmask", "foreground"):
                np.testing.assert_allclose(getattr(out[1][obj], name), getattr(out[0][obj], name), atol=1e-5,
                                           err_msg=f"frame {t} {obj}.{name}")
    # recorded at frame 1 (object a) and 4 (a, b); frame 5 re-prompts a known object: the a+b recording stays
    assert BufferReusingRecorder.recorded == 2
    # the foreground flag is part of what was recorded
    sessions[1].foreground = False
    assert sessions[1].step(images[6])["a"].foreground is None and BufferReusingRecorder.recorded == 3


def test_cuda_graphs_are_refused_on_the_cpu_with_a_hint(tiny_model):
    with pytest.raises(OAVMInputError, match="CUDA graphs need a CUDA device"):
        Engine(tiny_model, device="cpu", cuda_graphs=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_frame_conversion_on_the_device_is_the_numpy_conversion(dtype):
    rng = np.random.default_rng(0)
    if dtype == np.uint8:
        frame = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    else:
        frame = rng.uniform(-0.5, 1.5, (9, 11, 3)).astype(dtype)
    x, finite = unit_frame(torch.from_numpy(frame))
    assert x.shape == (1, 3, 9, 11) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(_to_unit_float(frame, "frame", clip=True)))
    assert finite is None if dtype == np.uint8 else bool(finite)


def test_a_nan_frame_is_refused_and_leaves_the_clip_as_it_was(tiny_model, make_clip):
    engine = Engine(tiny_model, device="cpu", precision="fp32")
    images, _ = make_clip(3, 32, 48, seed=1)
    session = engine.new_session()
    session.step(images[0], {"a": _box(32, 48, 4, 20, 4, 30)})
    before = {k: t.clone() for k, t in session._objects["a"].tensors().items()}
    bad = images[1].copy()
    bad[3, 4, 1] = np.inf
    with pytest.raises(OAVMInputError, match="NaN or infinite"):
        session.step(bad)
    assert session.frames_seen == 1
    for k, t in session._objects["a"].tensors().items():
        assert torch.equal(t, before[k]), k
    session.step(images[1])
    assert session.frames_seen == 2


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replays_match_eager_steps_on_the_gpu(tiny_model, make_clip, precision):
    images, _ = make_clip(6, 72, 128, seed=4)
    images = (images * 255).astype(np.uint8)
    a, b = _box(72, 128, 10, 50, 20, 70), _box(72, 128, 30, 70, 60, 120)
    sessions = [Engine(tiny_model, device="cuda", precision=precision, cuda_graphs=g).new_session(
        downsample_ratio=0.5) for g in (False, True)]
    atol = 1e-5 if precision == "fp32" else 2e-3
    handed_out = []
    for t, prompts in enumerate([{"a": a}, None, None, {"b": b}, None, None]):
        eager, graphed = (s.step(images[t], prompts) for s in sessions)
        handed_out.append((eager, graphed, {o: graphed[o].alpha.copy() for o in graphed}))
        for obj in eager:
            np.testing.assert_allclose(graphed[obj].alpha, eager[obj].alpha, atol=atol, err_msg=f"frame {t} {obj}")
            np.testing.assert_allclose(graphed[obj].foreground, eager[obj].foreground, atol=atol)
    assert sessions[1]._graph is not None
    for t, (_, graphed, copies) in enumerate(handed_out):   # later replays did not overwrite earlier results
        for obj in graphed:
            assert np.array_equal(graphed[obj].alpha, copies[obj]), f"frame {t} {obj}"


@cuda
def test_a_nan_frame_is_refused_on_the_gpu_with_graphs_too(tiny_model, make_clip):
    images, _ = make_clip(3, 32, 48, seed=1)
    session = Engine(tiny_model, device="cuda", cuda_graphs=True).new_session()
    session.step(images[0], {"a": _box(32, 48, 4, 20, 4, 30)})
    session.step(images[1])
    bad = images[2].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(OAVMInputError, match="NaN or infinite"):
        session.step(bad)
    assert session.frames_seen == 2
    session.step(images[2])


def test_packed_outputs_as_a_gpu_returns_them_give_the_same_mattes(tiny_model, make_clip, monkeypatch):
    """The GPU's form of a step's outputs - one (N, 5, H, W) tensor copied back at once - read into the same
    alpha, fgmask and foreground per object as the CPU's unpacked planes (two objects, foreground on)."""
    images, _ = make_clip(3, 40, 56, seed=2)
    prompts = {"a": _box(40, 56, 4, 20, 4, 30), "b": _box(40, 56, 18, 38, 20, 50)}
    plain = Engine(tiny_model, device="cpu", precision="fp32").new_session(downsample_ratio=0.5)
    expected = [plain.step(images[0], prompts)] + [plain.step(f) for f in images[1:]]

    unpacked = engine_module.advance_outputs

    def packed(*args, **kwargs):
        planes, nxt = unpacked(*args, **kwargs)
        return torch.cat(planes, dim=1).contiguous(), nxt

    monkeypatch.setattr(engine_module, "advance_outputs", packed)
    session = Engine(tiny_model, device="cpu", precision="fp32").new_session(downsample_ratio=0.5)
    got = [session.step(images[0], prompts)] + [session.step(f) for f in images[1:]]
    for t, (want, have) in enumerate(zip(expected, got)):
        assert list(want) == list(have) == ["a", "b"]
        for obj in want:
            for name in ("alpha", "fgmask", "foreground"):
                assert np.array_equal(getattr(have[obj], name), getattr(want[obj], name)), (t, obj, name)
            assert have[obj].foreground.shape == (40, 56, 3) and have[obj].alpha.flags.c_contiguous


def _half_outputs_match(tiny_model, make_clip, device: str, cuda_graphs: bool) -> None:
    """``output_dtype="float16"`` (the service's float16 replies) gives the float32 mattes rounded to half floats."""
    images, _ = make_clip(4, 48, 64, seed=5)
    prompts = {"a": _box(48, 64, 8, 30, 10, 40)}
    engines = [Engine(tiny_model, device=device, precision="fp32", cuda_graphs=cuda_graphs) for _ in range(2)]
    full, half = (e.new_session(downsample_ratio=0.5, output_dtype=d) for e, d in zip(engines, ("float32", "float16")))
    for t, frame in enumerate(images):
        want, have = (s.step(frame, prompts if t == 0 else None) for s in (full, half))
        for name in ("alpha", "fgmask", "foreground"):
            got, ref = getattr(have["a"], name), getattr(want["a"], name)
            assert got.dtype == np.float16 and got.shape == ref.shape, (t, name)
            if device == "cpu":
                np.testing.assert_array_equal(got, ref.astype(np.float16), err_msg=f"frame {t} {name}")
            else:   # two recordings of the step: the same kernels, but only half-float rounding is promised
                np.testing.assert_allclose(got, ref, atol=1e-3, err_msg=f"frame {t} {name}")
    with pytest.raises(OAVMInputError, match="output_dtype"):
        engines[0].new_session(output_dtype="bfloat16")


def test_half_float_outputs_are_the_float32_mattes_rounded(tiny_model, make_clip):
    _half_outputs_match(tiny_model, make_clip, "cpu", False)


@cuda
def test_half_float_outputs_are_the_float32_mattes_rounded_on_the_gpu_with_graphs(tiny_model, make_clip):
    _half_outputs_match(tiny_model, make_clip, "cuda", True)
