# SPDX-License-Identifier: GPL-3.0-or-later
"""Smoke test of ``python -m bench``: every bench's code path once, tiny sizes, few frames, a tiny random model.

It checks the shape of what the bench records (table, JSON rows, PNG), never a timing: the CPU is shared.
The run is real: the real engine, the real service on loopback through shared.client, RVM's ONNX in onnxruntime,
torch.profiler, OpenImageIO reading the PNG back.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.breakdown import LABEL_PREFIX, stage_labels  # noqa: E402
from bench.common import DeviceSpec, PeakMemory, Resolution, SampleClip, time_steps  # noqa: E402
from bench.report import Row, format_table  # noqa: E402

BENCHES = {"speed", "memory", "service", "rvm", "profile", "plugins"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench") / "results"
    cmd = [sys.executable, "-m", "bench", "--quick", "--frames", "3", "--warmup", "1", "--budget-s", "5",
           "--resolutions", "64x48,96x64@0.5", "--lengths", "3,6", "--mem-resolution", "64x48",
           "--profile-steps", "2", "--checkpoint", "random-tiny", "--devices", "cpu,cuda-fp16", "--threads", "1",
           "--service-variants-at", "64x48", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    return proc, out


def test_quick_run_records_one_table_as_json_and_png(quick_run):
    import torch

    proc, out = quick_run
    tag = "cpu-quick" if not torch.cuda.is_available() else None
    json_files = sorted(out.glob("*.json"))
    assert len(json_files) == 1 and (tag is None or json_files[0].stem == tag)
    data = json.loads(json_files[0].read_text())
    assert "\n".join(data["table"]) in proc.stdout, "the JSON holds the very table that was printed"
    assert data["meta"]["checkpoint"]["label"] == "random-tiny init"
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[bench ")]   # shown as it runs
    assert any("speed cpu fp32 64x48: " in line and line.endswith(" fps") for line in progress), proc.stderr
    assert any("memory cpu fp32 64x48: 6 of 6 frames" in line for line in progress), proc.stderr
    assert any(line.split("] ", 1)[1].startswith("service cpu fp32 64x48: ") and " vs in-process" in line
               for line in progress), proc.stderr
    machine = data["meta"]["machine"]   # measured with the process set-up of the `oavm` command
    assert machine["environment"]["OMP_WAIT_POLICY"] and machine["heap_kept"] is sys.platform.startswith("linux")
    rows = [Row(**r) for r in data["rows"]]
    assert {r.bench for r in rows} == BENCHES

    speed = {(r.device, r.input): r for r in rows if r.bench == "speed"}
    assert set(speed) == {(d, s) for d in ("cpu fp32", "cuda fp16") for s in ("64x48", "96x64 ds0.5")}
    for size in ("64x48", "96x64 ds0.5"):
        cpu = speed["cpu fp32", size]
        assert cpu.frames == 3 and cpu.fps > 0 and 0 < cpu.p50_ms <= cpu.p95_ms and cpu.peak_mib > 50
        assert cpu.cpu_ms > 0 and "threads=1" in cpu.note
        assert abs(1000.0 / cpu.fps - cpu.p50_ms) < 1e-6 * cpu.p50_ms
        if not torch.cuda.is_available():
            gpu = speed["cuda fp16", size]
            assert gpu.result == "not measured (no GPU here)" and gpu.fps is None

    memory = [r for r in rows if r.bench == "memory" and r.device == "cpu fp32"]
    assert [r.frames for r in memory] == [3, 6]
    assert memory[-1].result in ("PASS", "FAIL") and memory[-1].target.startswith("<= +5%")
    assert all(r.peak_mib > 50 and "session holds" in r.value for r in memory)

    service = [r for r in rows if r.bench == "service" and r.device == "cpu fp32"]
    assert [r.input for r in service] == ["64x48", "96x64 ds0.5", "64x48 msg", "64x48 f16", "64x48 f16 x2 tcp",
                                          "64x48 f16 x2 ipc"]
    assert all(r.value.startswith("x") and "in-process p50" in r.note for r in service)
    lockstep, streamed = service[:4], service[4:]
    assert all(r.frames == 3 for r in lockstep)
    assert all("transport + client" in r.note for r in lockstep), "the service log's own timings were found"
    assert "float16 frames and replies" in service[3].note
    assert [", frames in shared memory" in r.note for r in service] == [True, True, False, True, True, True]
    assert "frames in the messages (not used: turned off" in service[2].note
    assert all(r.frames >= 3 * 8 and "2 frames in flight" in r.note for r in streamed)
    assert all("the service's own time" in r.note for r in streamed)

    rvm = [r for r in rows if r.bench == "rvm" and r.device == "cpu fp32"]
    assert sorted(r.checkpoint for r in rvm) == ["RVM mnv3 fp32 ONNX"] * 2 + ["RVM mnv3 torch"] * 2
    assert all(r.fps > 0 and "OAVM x" in r.value and "its CPU time" in r.value for r in rvm)
    if not torch.cuda.is_available():   # the torch RVM also gets a row per GPU precision asked for
        gpu_rvm = [r for r in rows if r.bench == "rvm" and r.device == "cuda fp16"]
        assert [r.result for r in gpu_rvm] == ["not measured (no GPU here)"] * 2

    profile = [r for r in rows if r.bench == "profile" and r.device == "cpu fp32"]
    stages = {r.input.split(": ", 1)[1] for r in profile}
    assert {"backbone", "pfe", "oqg", "ogcr", "decoder", "engine + glue"} <= stages
    assert all("ms/step" in r.value for r in profile)
    assert data["meta"]["profile"][0]["top_ops"], "the JSON keeps the top operators of the profile"

    plugins = [r for r in rows if r.bench == "plugins"]      # the plug-ins' own file work, at the variants' size
    assert [r.input for r in plugins] == [f"64x48 {what}" for what in (
        "nuke: key a Source render", "nuke: a frame sent as pixels", "nuke: write a cache matte",
        "blender: read a plate", "blender: write a matte")]
    assert all(r.frames == 3 and r.fps > 0 and r.p50_ms > 0 and r.note for r in plugins)
    assert any("plugins cpu 64x48 blender: write a matte: " in line for line in progress), proc.stderr


def test_plugin_bench_matte_keeps_the_mask_shape_with_soft_edges():
    """The plugins rows write a matte of the frame's size: the mask box-blurred along each axis, nothing added."""
    from bench.plugins import _soft

    mask = np.zeros((48, 64), np.float32)
    mask[10:30, 20:40] = 1.0
    soft = _soft(mask, 3)
    assert soft.shape == mask.shape and soft.dtype == np.float32
    assert soft[20, 17] == pytest.approx(1 / 7) and soft[20, 20] == pytest.approx(4 / 7) and soft[20, 30] == 1.0
    assert soft.min() == 0.0 and soft.max() == 1.0


def test_quick_run_plot_is_a_small_png(quick_run):
    import OpenImageIO as oiio

    _, out = quick_run
    png = next(out.glob("*.png"))
    spec = oiio.ImageBuf(str(png)).spec()
    assert (spec.width, spec.height) == (1000, 700)
    assert png.stat().st_size < 300_000


def test_a_recorded_json_is_drawn_again(quick_run, tmp_path):
    """`python -m bench.plot RESULT.json` redraws the PNG from the JSON's rows (after a change to the plot)."""
    import shutil

    import OpenImageIO as oiio

    _, out = quick_run
    recorded = next(out.glob("*.json"))
    copy = tmp_path / recorded.name
    shutil.copy(recorded, copy)
    proc = subprocess.run([sys.executable, "-m", "bench.plot", str(copy)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = oiio.ImageBuf(str(copy.with_suffix(".png"))).spec()
    assert (spec.width, spec.height) == (1000, 700)


def test_bad_options_say_what_to_write(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--resolutions", "1920by1080", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "write e.g. 1920x1080" in proc.stderr
    with pytest.raises(argparse.ArgumentTypeError, match="cuda-fp16"):
        DeviceSpec.parse_list("gpu")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
        Resolution.parse("512x288@2")
    assert Resolution.parse("3840x2160@0.125").label == "3840x2160 ds0.125"
    assert DeviceSpec.parse_list("cuda") == [DeviceSpec("cuda", p) for p in ("fp32", "fp16", "bf16")]


def test_peak_memory_resets_to_current_rss():
    memory = PeakMemory("cpu")
    block = np.ones(64 * 2**20 // 8)            # 64 MiB touched
    high = memory.peak_bytes()
    del block
    memory.reset()
    assert memory.peak_bytes() < high - 32 * 2**20


def test_time_steps_keeps_prepare_off_the_clock():
    import time

    timing = time_steps(lambda i: time.sleep(0.05) or i, lambda x: None, start=0, warmup=1, frames=4, budget_s=10)
    assert timing.n == 4 and timing.p95_ms < 40         # a prepare on the clock would add its 50 ms


def test_sample_clip_plays_forwards_and_backwards():
    clip = SampleClip(64, 48)
    assert [clip.source_index(i) for i in (0, 15, 16, 30, 31)] == [0, 15, 14, 0, 1]
    frame = clip.frame(16)
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert clip.mask.shape == (48, 64) and 0 < clip.mask.mean() < 1


def test_stage_labels_cover_every_stage_of_the_network():
    import torch
    from torch.profiler import profile

    from oavm_service.model import OAVM, OAVMConfig

    model = OAVM(OAVMConfig.tiny()).eval()
    frames, mask = torch.rand(1, 2, 3, 64, 96), torch.ones(1, 1, 64, 96)
    with torch.inference_mode(), stage_labels(model) as stages, profile() as prof:
        model.forward_clip(frames, mask, downsample_ratio=0.5)
    names = {e.key for e in prof.key_averages()}
    assert {"backbone", "pfe", "oqg", "ogcr", "decoder", "refiner"} <= set(stages)
    assert {LABEL_PREFIX + s for s in stages} <= names
    assert not model._forward_hooks and not model.backbone._forward_pre_hooks, "hooks are removed afterwards"


def test_table_columns_line_up():
    rows = [Row("speed", "cpu fp32", "512x288", "ck", frames=3, fps=4.5, p50_ms=222.2, p95_ms=250.0,
                target=">= 5 fps (2 cores)", result="FAIL"),
            Row("speed", "cuda fp16", "1920x1080", "ck", result="not measured (no GPU here)")]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["bench", "device", "input"]
    assert lines[2].index("4.50") < lines[2].index("222.2") and "not measured (no GPU here)" in lines[3]
