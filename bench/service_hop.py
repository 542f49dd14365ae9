# SPDX-License-Identifier: GPL-3.0-or-later
"""The service hop: the same frames through the real ZeroMQ service and ``shared.client`` vs the engine in-process.

The service is the real ``python -m oavm_service serve`` on a free loopback port, with the same checkpoint, device
and precision as the in-process engine. Frames go as float32 RGB, what Blender's and Nuke's pixel buffers hold, and
through shared memory where the client can (``shared.shared_memory``, Linux); at 1080p a row with the frames in the
messages shows what that saves.
Service and in-process steps alternate frame by frame (and which goes first alternates too) so a neighbour's load on
a shared machine hits both alike; the ratio of their median frame times is the hop's cost: encoding, two loopback
copies, decoding and the service's own bookkeeping. The service logs its own time per request, which splits the
difference into "transport + client" (stable) and "service step vs in-process step" (noise on a shared CPU).

At the target size (1080p) three more rows show what a client that streams frames can get: float16 frames and
replies (``reply_dtype``) one at a time; the same with two frames in flight (``OAVMClient.matte_stream``), over
TCP and, where the platform has it, over ``ipc://``. A streamed row times blocks of frames, alternating a block
through the service with the same block in-process, and compares the median time per frame.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.common import OBJECT_ID, REPO, DeviceSpec, PeakMemory, Resolution, RunOptions, SampleClip, Timing, \
    cuda_sync, mib, one_spec_per_device
from bench.models import Checkpoint, bench_session, free_memory, open_engine
from bench.report import SERVICE_OVERHEAD_MAX, SERVICE_TARGET_SIZE, Row, announce, not_measured, verdict

READY_TEXT = "listening on"
# the service's log line per request: "matte clip=bench-512x288 frame=7 -> ok (123.4 ms, client ...)"
HANDLED = re.compile(r"matte clip=(?P<clip>\S+) frame=(?P<frame>\d+) -> ok \((?P<ms>[\d.]+) ms")


@dataclass
class Service:
    """A running service: where it listens, its process, and its log (which times every request it handles)."""

    endpoint: str
    proc: subprocess.Popen
    log_path: Path

    def handled_ms(self, clip_id: str, frames: set[int]) -> list[float]:
        """The service's own time for ``frames`` of ``clip_id`` (decode, engine step, encode), from its log."""
        found = []
        for m in HANDLED.finditer(self.log_path.read_text()):
            if m["clip"] == clip_id and int(m["frame"]) in frames:
                found.append(float(m["ms"]))
        return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STREAM_BLOCK = 8          # frames per block of a streamed row


@contextmanager
def running_service(ckpt: Checkpoint, spec: DeviceSpec, workdir: Path, ready_timeout_s: float = 180.0,
                    cuda_graphs: bool = True, transport: str = "tcp") -> Iterator[Service]:
    """Start ``python -m oavm_service serve`` on loopback (``transport`` "tcp" or "ipc"); yield it; always stop it.

    The service gets this process's torch thread count, so both sides of the comparison compute alike.
    """
    import tempfile

    import torch

    threads = torch.get_num_threads()
    if transport == "ipc":      # a short path: ipc endpoints are Unix socket names (about 100 bytes at most)
        sock_dir = tempfile.mkdtemp(prefix="oavm-")
        endpoint = f"ipc://{sock_dir}/bench.sock"
    else:
        sock_dir = None
        endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_path = Path(workdir) / f"service-{spec.device}-{spec.precision}-{transport}.log"
    cmd = [sys.executable, "-m", "oavm_service", "serve", "--endpoint", endpoint, "--checkpoint", str(ckpt.path),
           "--device", spec.device, "--precision", spec.precision, "--state-dir", str(Path(workdir) / "state"),
           "--log-level", "info"] + ([] if cuda_graphs else ["--no-cuda-graphs"])
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                log.seek(0)
                if READY_TEXT in log.read():
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the OAVM service did not start (exit {proc.poll()}); command: "
                                       f"{' '.join(cmd)}\n{log.read()[-4000:]}")
                time.sleep(0.1)
            yield Service(endpoint, proc, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if sock_dir:
                shutil.rmtree(sock_dir, ignore_errors=True)


def _float_frame(clip: SampleClip, i: int, dtype=np.float32) -> np.ndarray:
    return (clip.frame(i).astype(np.float32) / np.float32(255.0)).astype(dtype, copy=False)


def _target(res: Resolution) -> str:
    return f"<= +{SERVICE_OVERHEAD_MAX:.0%} at {SERVICE_TARGET_SIZE}" if res.size == SERVICE_TARGET_SIZE else ""


def _open_both(client, engine, res: Resolution, clip: SampleClip, clip_id: str, dtype=np.float32):
    """The row's clip started at frame 0 in the service and in-process, with the same frame and mask; replies come
    back in the frames' dtype. Returns the in-process session."""
    session = bench_session(engine, res)
    frame = _float_frame(clip, 0, dtype)
    client.open_clip(clip_id, 0, frame, {OBJECT_ID: clip.mask}, restart=True,
                     downsample_ratio=res.downsample_ratio, reply_dtype=np.dtype(dtype).name)
    session.step(frame, {OBJECT_ID: clip.mask})
    return session


def _versus_in_process(hop: Timing, local: Timing, res: Resolution) -> dict[str, str]:
    """A service row's ratio columns (value, target, result): its median frame time over the in-process one."""
    ratio, target = hop.p50_ms / local.p50_ms, _target(res)
    return {"value": f"x{ratio:.3f} vs in-process ({ratio - 1:+.1%}, {hop.p50_ms - local.p50_ms:+.0f} ms)",
            "target": target, "result": verdict(ratio - 1 <= SERVICE_OVERHEAD_MAX) if target else ""}


def hop_row(client, service: Service, engine, spec: DeviceSpec, res: Resolution, ckpt: Checkpoint,
            opts: RunOptions, *, half: bool = False) -> Row:
    """One resolution in lockstep; the service's log splits its extra time into transport and service work.

    ``half``: float16 frames and replies (both sides get the same float16 frames). A client made with
    ``shared_memory=False`` gives the row with the frames in the messages (" msg")."""
    clip = SampleClip(res.width, res.height)
    dtype = np.float16 if half else np.float32
    in_messages = not client.shared_memory
    suffix = (" f16" if half else "") + (" msg" if in_messages else "")
    clip_id = "bench-" + (res.label + suffix).replace(" ", "-")     # the log is searched by clip id
    sync = cuda_sync(str(engine.device))
    service_memory = PeakMemory("cpu", service.proc.pid) if spec.device == "cpu" else None
    if service_memory:
        service_memory.reset()
    session = _open_both(client, engine, res, clip, clip_id, dtype)
    hop, local, timed = Timing(), Timing(), set()
    t_end = time.perf_counter() + opts.budget_s
    i = 1
    while hop.n < opts.frames and (hop.n < 3 or time.perf_counter() < t_end):
        frame = _float_frame(clip, i, dtype)
        # alternate who goes first, so neither side always runs right after the other (caches, scheduler)
        first, second = ("service", "local") if i % 2 else ("local", "service")
        times = {}
        for side in (first, second):
            t0 = time.perf_counter()
            if side == "service":
                client.matte(clip_id, i, frame)
            else:
                session.step(frame)
                sync()
            times[side] = time.perf_counter() - t0
        if i > opts.warmup:
            hop.seconds.append(times["service"])
            local.seconds.append(times["local"])
            timed.add(i)
        i += 1
    client.close_clip(clip_id)
    handled = service.handled_ms(clip_id, timed)
    split = (f"; in the service {statistics.median(handled):.1f} ms, so transport + client "
             f"{hop.p50_ms - statistics.median(handled):.1f} ms" if handled else "")
    wire = ("float16 frames and replies" if half else "float32 frames") + _frames_via(client)
    row = Row("service", spec.label, res.label + suffix, ckpt.label, frames=hop.n, fps=hop.fps,
              p50_ms=hop.p50_ms, p95_ms=hop.p95_ms,
              peak_mib=mib(service_memory.peak_bytes()) if service_memory else None,
              **_versus_in_process(hop, local, res),
              note=f"in-process p50 {local.p50_ms:.1f} ms{split}; {wire}, one frame at a time, tcp"
                   + ("; service RSS peak" if service_memory else ""))
    return announce(row)


def stream_row(client, service: Service, engine, spec: DeviceSpec, res: Resolution, ckpt: Checkpoint,
               opts: RunOptions, transport: str) -> Row:
    """Float16 frames and replies, two in flight (``matte_stream``), against the same frames in-process.

    Blocks of STREAM_BLOCK frames alternate between the service and the engine (and which goes first alternates);
    each block's time per frame is one sample, the first blocks (``opts.warmup`` frames) are warm-up."""
    clip = SampleClip(res.width, res.height)
    clip_id = f"bench-stream-{transport}-" + res.label.replace(" ", "-")
    sync = cuda_sync(str(engine.device))
    session = _open_both(client, engine, res, clip, clip_id, np.float16)
    hop, local, timed = Timing(), Timing(), set()
    t_end = time.perf_counter() + opts.budget_s
    i, block = 1, 0
    while hop.n < 3 or (hop.n * STREAM_BLOCK < opts.frames and time.perf_counter() < t_end):
        frames = [_float_frame(clip, i + k, np.float16) for k in range(STREAM_BLOCK)]
        times = {}
        for side in (("service", "local") if block % 2 else ("local", "service")):
            t0 = time.perf_counter()
            if side == "service":
                for _ in client.matte_stream(clip_id, i, frames):
                    pass
            else:
                for f in frames:
                    session.step(f)
                sync()
            times[side] = (time.perf_counter() - t0) / STREAM_BLOCK
        if i > opts.warmup:
            hop.seconds.append(times["service"])
            local.seconds.append(times["local"])
            timed.update(range(i, i + STREAM_BLOCK))
        i += STREAM_BLOCK
        block += 1
    client.close_clip(clip_id)
    handled = service.handled_ms(clip_id, timed)
    split = (f"; the service's own time {statistics.median(handled):.1f} ms a request (decode, step, encode)"
             if handled else "")
    row = Row("service", spec.label, f"{res.label} f16 x2 {transport}", ckpt.label, frames=hop.n * STREAM_BLOCK,
              fps=hop.fps, p50_ms=hop.p50_ms, p95_ms=hop.p95_ms, **_versus_in_process(hop, local, res),
              note=f"in-process p50 {local.p50_ms:.1f} ms a frame; float16 frames and replies{_frames_via(client)}, "
                   f"2 frames in flight (matte_stream), {transport}; medians of blocks of {STREAM_BLOCK} frames{split}")
    return announce(row)


def _frames_via(client) -> str:
    """Where the row's frames went: ", frames in shared memory" or ", frames in the messages (why)"."""
    verdict = client.shm_verdict or "not asked"
    return ", frames in shared memory" if verdict == "ok" else f", frames in the messages ({verdict})"


def run_service(specs: list[DeviceSpec], resolutions: list[Resolution], ckpt: Checkpoint, opts: RunOptions,
                workdir: Path, variants_at: str = SERVICE_TARGET_SIZE) -> list[Row]:
    rows: list[Row] = []
    for spec in one_spec_per_device(specs):
        reason = spec.missing_reason()
        if reason:
            rows.extend(not_measured("service", spec.label, res.label, ckpt.label, reason, _target(res))
                        for res in resolutions)
            continue
        rows.extend(_rows_on(spec, resolutions, ckpt, opts, workdir, variants_at))
        free_memory(spec.device)
    return rows


def _rows_on(spec: DeviceSpec, resolutions: list[Resolution], ckpt: Checkpoint, opts: RunOptions,
             workdir: Path, variants_at: str) -> list[Row]:
    from shared.client import OAVMClient

    engine = open_engine(ckpt, spec, cuda_graphs=opts.cuda_graphs)
    target = [res for res in resolutions if res.size == variants_at]
    rows = []
    with running_service(ckpt, spec, workdir, cuda_graphs=opts.cuda_graphs) as service:
        with OAVMClient(service.endpoint, timeout_s=600.0, retries=0) as client, \
                OAVMClient(service.endpoint, timeout_s=600.0, retries=0, shared_memory=False) as in_messages:
            rows += [hop_row(client, service, engine, spec, res, ckpt, opts) for res in resolutions]
            for res in target:
                rows.append(hop_row(in_messages, service, engine, spec, res, ckpt, opts))
                rows.append(hop_row(client, service, engine, spec, res, ckpt, opts, half=True))
                rows.append(stream_row(client, service, engine, spec, res, ckpt, opts, "tcp"))
    if target and hasattr(socket, "AF_UNIX"):
        with running_service(ckpt, spec, workdir, cuda_graphs=opts.cuda_graphs, transport="ipc") as service:
            with OAVMClient(service.endpoint, timeout_s=600.0, retries=0) as client:
                rows += [stream_row(client, service, engine, spec, res, ckpt, opts, "ipc") for res in target]
    return rows
