# SPDX-License-Identifier: GPL-3.0-or-later
"""What every benchmark shares: the specs of what to run, the clip they feed, timing and memory readings.

The clip is the bundled sample (``samples/judo``, real footage) resized to the bench resolution and played forwards
and backwards, so every bench - OAVM in-process, through the service, RVM - sees the same frames for any length.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from oavm_service.heap import release_freed_memory

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "samples" / "judo"
RESULTS_DIR = REPO / "bench" / "results"
OBJECT_ID = "judoka"
NO_GPU = "not measured (no GPU here)"
PRECISIONS = ("fp32", "fp16", "bf16")


# --------------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Resolution:
    """A frame size, with the downsample ratio the session runs at (``None``: the engine's automatic choice)."""

    width: int
    height: int
    downsample_ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        """``WIDTHxHEIGHT`` or ``WIDTHxHEIGHT@RATIO``, e.g. ``3840x2160@0.125``."""
        size, _, ratio = text.strip().partition("@")
        try:
            width, height = (int(v) for v in size.lower().split("x"))
            ds = float(ratio) if ratio else None
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"resolution {text!r} is not WIDTHxHEIGHT[@RATIO]; write e.g. 1920x1080 or 3840x2160@0.125") from None
        if width < 16 or height < 16:
            raise argparse.ArgumentTypeError(f"resolution {text!r} is too small; use at least 16x16")
        if ds is not None and not 0 < ds <= 1:
            raise argparse.ArgumentTypeError(f"downsample ratio in {text!r} must be in (0, 1], e.g. @0.25")
        return cls(width, height, ds)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def label(self) -> str:
        return self.size if self.downsample_ratio is None else f"{self.size} ds{self.downsample_ratio:g}"

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DeviceSpec:
    """Where and at which precision the engine runs: ``cpu``/``cuda`` x ``fp32``/``fp16``/``bf16``."""

    device: str
    precision: str

    @classmethod
    def parse_list(cls, text: str) -> list["DeviceSpec"]:
        """``cpu``, ``cuda`` (all three precisions), ``cuda-fp16``, ``cpu-bf16``... comma separated."""
        specs: list[DeviceSpec] = []
        for item in (t.strip().lower() for t in text.split(",") if t.strip()):
            device, _, precision = item.partition("-")
            if device not in ("cpu", "cuda") or (precision and precision not in PRECISIONS):
                raise argparse.ArgumentTypeError(
                    f"device {item!r} is not one of cpu, cuda, cpu-fp32, cuda-fp16, cuda-bf16, cuda-fp32")
            if precision:
                specs.append(cls(device, precision))
            elif device == "cuda":
                specs.extend(cls("cuda", p) for p in PRECISIONS)
            else:
                specs.append(cls("cpu", "fp32"))
        if not specs:
            raise argparse.ArgumentTypeError("--devices is empty; write e.g. cpu or cpu,cuda-fp16")
        return list(dict.fromkeys(specs))

    @property
    def label(self) -> str:
        return f"{self.device} {self.precision}"

    def missing_reason(self) -> str | None:
        """Why this spec cannot run here, in the words the table prints; ``None`` when it can."""
        import torch

        if self.device == "cuda":
            if not torch.cuda.is_available():
                return NO_GPU
            if self.precision == "bf16" and not torch.cuda.is_bf16_supported():
                return "not measured (this GPU has no bf16)"
        return None


@dataclass(frozen=True)
class RunOptions:
    """How hard each measurement tries: warm-up steps, timed frames, and a time budget per row for slow CPUs."""

    frames: int = 30
    warmup: int = 5
    budget_s: float = 60.0     # stop timing a row after this long (keeping at least 3 frames)
    cuda_graphs: bool = True    # CUDA rows: the engine's default (steady-state steps replayed as CUDA graphs)


def one_spec_per_device(specs: list[DeviceSpec]) -> list[DeviceSpec]:
    """The product's default precision per device (fp32 on CPU, fp16 on CUDA) for benches where precision does
    not change the answer (memory growth, service overhead); another precision only if the default is not asked."""
    chosen: dict[str, DeviceSpec] = {}
    for spec in specs:
        if spec.device not in chosen or spec.precision == ("fp16" if spec.device == "cuda" else "fp32"):
            chosen[spec.device] = spec
    return list(chosen.values())


def parse_lengths(text: str) -> list[int]:
    """``100,1000,5000`` -> sorted clip lengths for the memory bench."""
    try:
        lengths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths {text!r} must be frame counts like 100,1000,5000") from None
    if not lengths or lengths[0] < 2:
        raise argparse.ArgumentTypeError("--lengths needs frame counts of at least 2, e.g. 100,1000,5000")
    return lengths


# ---------------------------------------------------------------------------------------------------- the clip

_SOURCE: tuple[list[np.ndarray], np.ndarray] | None = None


def _load_sample() -> tuple[list[np.ndarray], np.ndarray]:
    """The sample frames (uint8 RGB) and the first frame's mask (red channel of the palette PNG), read once.

    Kept as numpy arrays, not OpenImageIO buffers: buffers alive at interpreter exit make its bindings complain.
    """
    global _SOURCE
    if _SOURCE is None:
        import OpenImageIO as oiio

        paths = sorted((SAMPLE_DIR / "frames").glob("*.jpg"))
        mask_path = SAMPLE_DIR / "masks" / "00000.png"
        if not paths or not mask_path.exists():
            raise FileNotFoundError(f"the sample clip is missing from {SAMPLE_DIR}; restore it with git checkout")
        frames = [oiio.ImageBuf(str(p)).get_pixels(oiio.UINT8) for p in paths]
        mask = oiio.ImageBuf(str(mask_path)).get_pixels(oiio.FLOAT)[..., 0] > 0
        _SOURCE = (frames, mask.astype(np.float32))
    return _SOURCE


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resample (not a filtered resize: 0.25 s instead of 2 s for a 4K frame; speed is all we need)."""
    import OpenImageIO as oiio

    array = array.reshape(array.shape[0], array.shape[1], -1)   # (H, W, C) also for a one-channel mask
    if array.shape[:2] == (height, width):
        return array
    buf = oiio.ImageBuf(np.ascontiguousarray(array))
    roi = oiio.ROI(0, width, 0, height, 0, 1, 0, buf.spec().nchannels)
    return oiio.ImageBufAlgo.resample(buf, roi=roi).get_pixels(buf.spec().format).reshape(height, width, -1)


class SampleClip:
    """The bundled clip at ``width x height``: ``frame(i)`` for any ``i`` (ping-pong through the 16 frames).

    Frames are uint8 RGB, as a plug-in reading 8-bit plates would send them. Small sizes are cached; large ones are
    resized on demand so the bench's own buffers do not inflate the peak memory it reports.
    """

    CACHE_LIMIT_PIXELS = 1_000_000

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self._sources, mask = _load_sample()
        self._cache: dict[int, np.ndarray] = {}
        self.mask = (_resize(mask, width, height)[..., 0] > 0.5).astype(np.float32)

    def __len__(self) -> int:
        return len(self._sources)

    def source_index(self, i: int) -> int:
        period = 2 * len(self._sources) - 2
        k = i % period
        return k if k < len(self._sources) else period - k

    def frame(self, i: int) -> np.ndarray:
        k = self.source_index(i)
        if k in self._cache:
            return self._cache[k]
        frame = _resize(self._sources[k], self.width, self.height).astype(np.uint8)
        if self.width * self.height <= self.CACHE_LIMIT_PIXELS:
            self._cache[k] = frame
        return frame


# ----------------------------------------------------------------------------------------------- measurements

@dataclass
class Timing:
    """Per-frame wall times of the timed (post warm-up) steps, and the CPU time this process spent on each.

    On a shared CPU the wall time depends on the neighbours; the CPU time (all threads of this process) much less,
    so it tells "slow because busy" from "slow because heavy".
    """

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seconds)

    @property
    def p50_ms(self) -> float:
        return 1000.0 * statistics.median(self.seconds)

    @property
    def p95_ms(self) -> float:
        return 1000.0 * float(np.percentile(self.seconds, 95))

    @property
    def cpu_ms(self) -> float | None:
        return 1000.0 * statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def fps(self) -> float:
        """Median frames per second: 1 / median frame time (robust to a neighbour's burst on a shared CPU)."""
        return 1.0 / statistics.median(self.seconds)


def time_steps(prepare: Callable[[int], object], step: Callable[[object], object], *, start: int, warmup: int,
               frames: int, budget_s: float, sync: Callable[[], None] = lambda: None) -> Timing:
    """Run ``warmup`` untimed steps then up to ``frames`` timed ones (at least 3, at most ``budget_s`` of them).

    ``prepare(i)`` builds frame ``i``'s input outside the clock; only ``step`` (plus ``sync``, which waits for the
    GPU) is timed.
    """
    i = start
    for _ in range(warmup):
        step(prepare(i))
        i += 1
    sync()
    timing = Timing()
    t_end = time.perf_counter() + budget_s
    while timing.n < frames and (timing.n < 3 or time.perf_counter() < t_end):
        x = prepare(i)
        c0, t0 = time.process_time(), time.perf_counter()
        step(x)
        sync()
        timing.seconds.append(time.perf_counter() - t0)
        timing.cpu_seconds.append(time.process_time() - c0)
        i += 1
    return timing


def _proc_status_kib(key: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}; peak memory needs Linux")


class PeakMemory:
    """Peak memory of a process on one device: RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA.

    On CPU ``reset()`` writes 5 to ``/proc/PID/clear_refs``, which sets the high-water mark (``VmHWM``) back to
    the current RSS, so each measurement sees only its own peak (Linux >= 4.0; no psutil needed). Before that it
    asks glibc to hand freed heap back to the kernel (``malloc_trim``), else a previous, larger row's freed but
    still resident memory would sit under every later peak. ``pid`` may be another process of the same user (the
    service; only its high-water mark is reset); CUDA peaks are only readable for this process.
    """

    def __init__(self, device: str, pid: int | str = "self"):
        self.device, self.pid = device, pid
        self.kind = "CUDA max allocated" if device.startswith("cuda") else "RSS peak"

    def reset(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self.pid == "self":
            gc.collect()
            release_freed_memory()
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            # the kernel refused: the peak is then the process's since it started, and the table says so
            self.kind = "RSS peak since start"

    def peak_bytes(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return 1024 * _proc_status_kib("VmHWM", self.pid)


def cuda_sync(device: str) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (a no-op on CPU), for honest GPU timings."""
    if not device.startswith("cuda"):
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20
