# SPDX-License-Identifier: GPL-3.0-or-later
"""Speed: ``ClipSession.step`` per resolution and device - fps, latency p50/p95, peak memory.

One session per row, prompted on frame 0 with the sample's mask (that step is not timed: it also writes the
long-term memory), then ``warmup`` untimed steps, then the timed ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bench.common import OBJECT_ID, DeviceSpec, PeakMemory, Resolution, RunOptions, SampleClip, Timing, \
    cuda_sync, mib, time_steps
from bench.models import Checkpoint, bench_session, free_memory, open_engine
from bench.report import Row, announce, not_measured, speed_target, speed_target_text, verdict


@dataclass
class SessionRun:
    """The timed steps of one session and the peak memory while it ran."""

    timing: Timing
    peak_bytes: int
    memory_kind: str


def run_session(engine, res: Resolution, opts: RunOptions,
                frame_of: Callable[[SampleClip, int], np.ndarray] = SampleClip.frame) -> SessionRun:
    """Prompt a new session on frame 0, then time ``opts.frames`` steps on the following frames."""
    clip = SampleClip(res.width, res.height)
    device = str(engine.device)
    memory = PeakMemory(device)
    session = bench_session(engine, res)
    memory.reset()
    session.step(frame_of(clip, 0), {OBJECT_ID: clip.mask})
    timing = time_steps(lambda i: frame_of(clip, i), session.step, start=1, warmup=opts.warmup,
                        frames=opts.frames, budget_s=opts.budget_s, sync=cuda_sync(device))
    return SessionRun(timing, memory.peak_bytes(), memory.kind)


def gpu_note(spec: DeviceSpec) -> str:
    """Which card a CUDA row ran on: the targets are for one H100, other cards are reported as they are."""
    if spec.device != "cuda":
        return ""
    return torch.cuda.get_device_name(torch.cuda.current_device())


def speed_row(engine, spec: DeviceSpec, res: Resolution, ckpt: Checkpoint, opts: RunOptions) -> Row:
    run = run_session(engine, res, opts)
    target = speed_target(spec.device, spec.precision, res.size)
    t = run.timing
    row = Row("speed", spec.label, res.label, ckpt.label, frames=t.n, fps=t.fps, p50_ms=t.p50_ms,
              p95_ms=t.p95_ms, cpu_ms=t.cpu_ms if spec.device == "cpu" else None, peak_mib=mib(run.peak_bytes),
              target=speed_target_text(target, spec.device) if target else "",
              result=verdict(t.fps >= target) if target else "",
              note=", ".join(filter(None, [gpu_note(spec), "CUDA graphs" if engine.cuda_graphs else "",
                                           run.memory_kind,
                                           f"threads={torch.get_num_threads()}" if spec.device == "cpu" else ""])))
    return announce(row)


def run_speed(specs: list[DeviceSpec], resolutions: list[Resolution], ckpt: Checkpoint,
              opts: RunOptions) -> list[Row]:
    rows: list[Row] = []
    for spec in specs:
        reason = spec.missing_reason()
        if reason:
            for res in resolutions:
                target = speed_target(spec.device, spec.precision, res.size)
                rows.append(not_measured("speed", spec.label, res.label, ckpt.label, reason,
                                         speed_target_text(target, spec.device) if target else ""))
            continue
        rows.extend(_rows_on(spec, resolutions, ckpt, opts))
        free_memory(spec.device)
    return rows


def _rows_on(spec: DeviceSpec, resolutions: list[Resolution], ckpt: Checkpoint, opts: RunOptions) -> list[Row]:
    engine = open_engine(ckpt, spec, cuda_graphs=opts.cuda_graphs)
    return [speed_row(engine, spec, res, ckpt, opts) for res in resolutions]
