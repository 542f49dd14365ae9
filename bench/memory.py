# SPDX-License-Identifier: GPL-3.0-or-later
"""Memory against clip length: one session runs the longest clip; the peak is read as it passes each length.

The engine keeps the first frame as long-term memory and the last frame as short-term memory (paper, Section 3.1:
"we use only the first frame for long-term attention and the last frame for short-term attention"), so the peak
after 5,000 frames must equal the peak after 100. The peak after N frames of one long run *is* the peak of an
N-frame clip (same frames, same steps), so one run of the longest clip measures every length. Each step is the real
``ClipSession.step``; ``--mem-resolution`` (e.g. ``512x288@0.5``) makes a slow CPU's steps cheaper.
"""
from __future__ import annotations

import time

from bench.common import OBJECT_ID, DeviceSpec, PeakMemory, Resolution, SampleClip, cuda_sync, mib, \
    one_spec_per_device
from bench.models import Checkpoint, bench_session, free_memory, open_engine
from bench.report import MEMORY_GROWTH_MAX, Row, announce, not_measured, progress, verdict


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


# Frame size when --mem-resolution is not given: the real size on a GPU; on a CPU small frames, because 5,000 steps
# at 512x288 take over an hour on two cores (same network, same engine step; see docs/performance.md).
DEFAULT_SIZE = {"cuda": Resolution(512, 288, 1.0), "cpu": Resolution(64, 64, 1.0)}


def run_memory(specs: list[DeviceSpec], size: Resolution | None, lengths: list[int], ckpt: Checkpoint
               ) -> list[Row]:
    rows: list[Row] = []
    target = f"<= +{MEMORY_GROWTH_MAX:.0%} at {lengths[-1]} vs {lengths[0]} frames"
    for spec in one_spec_per_device(specs):
        res = size or DEFAULT_SIZE[spec.device]
        reason = spec.missing_reason()
        if reason:
            rows.append(not_measured("memory", spec.label, f"{res.label} x{lengths[-1]}", ckpt.label, reason,
                                     target))
            continue
        rows.extend(_rows_on(spec, res, lengths, ckpt, target))
        free_memory(spec.device)
    return rows


def _rows_on(spec: DeviceSpec, res: Resolution, lengths: list[int], ckpt: Checkpoint, target: str) -> list[Row]:
    engine = open_engine(ckpt, spec)
    clip = SampleClip(res.width, res.height)
    memory = PeakMemory(str(engine.device))
    sync = cuda_sync(str(engine.device))
    session = bench_session(engine, res)
    memory.reset()
    session.step(clip.frame(0), {OBJECT_ID: clip.mask})
    readings: dict[int, tuple[int, int, float]] = {}   # length -> (peak bytes, session tensor bytes, seconds)
    t0 = time.perf_counter()
    for i in range(1, lengths[-1]):
        session.step(clip.frame(i))
        if i + 1 in lengths:
            sync()
            readings[i + 1] = (memory.peak_bytes(), session.memory_bytes(), time.perf_counter() - t0)
            progress(f"memory {spec.label} {res.label}: {i + 1} of {lengths[-1]} frames, "
                     f"peak {mib(readings[i + 1][0]):.0f} MiB")
    base_peak = readings[lengths[0]][0]
    rows = []
    for n in lengths:
        peak, held, seconds = readings[n]
        growth = peak / base_peak - 1.0
        last = n == lengths[-1]
        rows.append(Row("memory", spec.label, f"{res.label} x{n}", ckpt.label, frames=n, peak_mib=mib(peak),
                        value=f"{growth:+.1%} vs {lengths[0]}; session holds {_size(held)}",
                        target=target if last else "", result=verdict(growth <= MEMORY_GROWTH_MAX) if last else "",
                        note=f"{memory.kind}; {(n - 1) / seconds:.2f} fps mean"))
        announce(rows[-1])
    return rows
