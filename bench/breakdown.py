# SPDX-License-Identifier: GPL-3.0-or-later
"""Where a step's time goes: per-module breakdown (backbone, PFE, OQG, OGCR, decoder, refiner) from torch.profiler.

The model files carry no profiler labels, so the bench adds them from outside with forward hooks: every module
under a top-level child of ``OAVM`` opens (outermost call only) a ``torch.profiler.record_function`` range named
``oavm::<stage>``. Hooking the descendants too matters: PFE's ``key()`` and ``memorize()`` are methods, not
``forward``, but the layers they call are modules. The stage of a child is its source file (``aspp`` is RVM's
LR-ASPP from ``backbone.py``, so it counts as backbone) or else its attribute name (``project_mat``...).
Whatever no module covers - the engine's frame conversion, resampling and padding in ``OAVM``, copying the mattes
back to numpy - is reported as "engine + glue".
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from bench.common import OBJECT_ID, DeviceSpec, Resolution, SampleClip, cuda_sync
from bench.models import Checkpoint, bench_session, free_memory, open_engine
from bench.report import Row, announce, not_measured

STAGES = ("backbone", "pfe", "oqg", "ogcr", "decoder", "refiner")
LABEL_PREFIX = "oavm::"
GLUE = "engine + glue"


def stage_of(name: str, module) -> str:
    stem = type(module).__module__.rsplit(".", 1)[-1]
    return stem if stem in STAGES else name


@contextmanager
def stage_labels(model) -> Iterator[list[str]]:
    """Label each stage's time with ``record_function`` while the block runs; yields the stage names."""
    from torch.profiler import record_function

    depth: dict[str, int] = defaultdict(int)
    ranges: dict[str, object] = {}

    def enter(stage: str) -> None:
        if depth[stage] == 0:
            ranges[stage] = record_function(LABEL_PREFIX + stage).__enter__()
        depth[stage] += 1

    def leave(stage: str) -> None:
        depth[stage] -= 1
        if depth[stage] == 0:
            ranges.pop(stage).__exit__(None, None, None)

    handles, stages = [], []
    for name, child in model.named_children():
        stage = stage_of(name, child)
        stages.append(stage)
        for module in child.modules():
            handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: enter(s)))
            handles.append(module.register_forward_hook(lambda m, a, o, s=stage: leave(s)))
    try:
        yield list(dict.fromkeys(stages))
    finally:
        for h in handles:
            h.remove()


def _event_us(event, on_cuda: bool) -> float:
    """Time of a labelled range: GPU time on CUDA (the CPU only queues kernels there), CPU time otherwise."""
    if on_cuda:
        return float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0))
    return float(event.cpu_time_total)


def profile_steps(engine, res: Resolution, steps: int, warmup: int) -> dict:
    """Run ``warmup`` then ``steps`` profiled steps; return per-stage ms per step, the step's wall ms, top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = str(engine.device)
    on_cuda = device.startswith("cuda")
    sync = cuda_sync(device)
    clip = SampleClip(res.width, res.height)
    session = bench_session(engine, res)
    session.step(clip.frame(0), {OBJECT_ID: clip.mask})
    for i in range(1, 1 + warmup):
        session.step(clip.frame(i))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    walls = []
    with stage_labels(engine.model) as stages, profile(activities=activities) as prof:
        for i in range(1 + warmup, 1 + warmup + steps):
            frame = clip.frame(i)
            sync()
            t0 = time.perf_counter()
            session.step(frame)
            sync()
            walls.append(time.perf_counter() - t0)
    # a label can appear twice (its CPU range and, on CUDA, its GPU annotation): take the larger time
    labelled: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith(LABEL_PREFIX):
            labelled[e.key] = max(labelled[e.key], _event_us(e, on_cuda))
    per_stage = {s: labelled[LABEL_PREFIX + s] / 1000.0 / steps for s in stages if LABEL_PREFIX + s in labelled}
    wall_ms = 1000.0 * statistics.fmean(walls)   # a mean, like the per-stage times it is compared with
    ops = sorted((e for e in prof.key_averages() if not e.key.startswith(LABEL_PREFIX)),
                 key=lambda e: e.self_device_time_total if on_cuda else e.self_cpu_time_total, reverse=True)
    top_ops = [{"op": e.key, "ms_per_step": (e.self_device_time_total if on_cuda else e.self_cpu_time_total)
                / 1000.0 / steps, "calls_per_step": e.count / steps} for e in ops[:12]]
    return {"stages_ms": per_stage, "wall_ms": wall_ms, "top_ops": top_ops, "threads": torch.get_num_threads()}


def run_breakdown(spec: DeviceSpec, res: Resolution, ckpt: Checkpoint, steps: int, warmup: int
                  ) -> tuple[list[Row], dict]:
    """Profile rows (one per stage + glue) on ``spec``; also the raw numbers (top operators) for the JSON."""
    reason = spec.missing_reason()
    if reason:
        return [not_measured("profile", spec.label, res.label, ckpt.label, reason)], {}
    engine = open_engine(ckpt, spec, cuda_graphs=False)   # a graph replay runs no module: nothing to attribute
    result = profile_steps(engine, res, steps, warmup)
    del engine
    free_memory(spec.device)
    wall = result["wall_ms"]
    shares = dict(result["stages_ms"])
    shares[GLUE] = max(0.0, wall - sum(shares.values()))
    rows = [Row("profile", spec.label, f"{res.label}: {stage}", ckpt.label, frames=steps,
                value=f"{ms:.1f} ms/step = {ms / wall:.0%}")
            for stage, ms in sorted(shares.items(), key=lambda kv: -kv[1])]
    rows[0].note = f"step {wall:.1f} ms mean under the profiler (hooks and profiling add to it)" + \
        (", eager steps (no CUDA graphs)" if spec.device == "cuda" else "")
    announce(rows[0])
    return rows, {"device": spec.label, "resolution": res.label, **result}
