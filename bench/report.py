# SPDX-License-Identifier: GPL-3.0-or-later
"""The one table every bench writes into: its rows, the targets from issue 9 and the text/JSON renderings."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, fields

# Issue 9's targets. They are reported per row, never asserted: a shared 2-core CPU is no place for hard limits.
SPEED_TARGETS_FPS: dict[tuple[str, str, str], float] = {
    ("cuda", "fp16", "1920x1080"): 60.0,   # one H100
    ("cuda", "fp16", "3840x2160"): 30.0,   # one H100, with a downsample ratio
    ("cpu", "fp32", "512x288"): 5.0,       # 2 CPU cores
}
MEMORY_GROWTH_MAX = 0.05        # peak memory at the longest clip within 5% of the shortest
SERVICE_OVERHEAD_MAX = 0.10     # the ZeroMQ hop may cost at most 10% at 1080p
SERVICE_TARGET_SIZE = "1920x1080"


@dataclass
class Row:
    """One line of the table. Numbers stay numbers (``None``: not applicable); ``result`` carries PASS/FAIL."""

    bench: str                       # speed | memory | service | rvm | profile
    device: str                      # "cpu fp32", "cuda fp16", ...
    input: str                       # "1920x1080 ds0.25", "512x288 x5000 frames", "backbone", ...
    checkpoint: str                  # short label of the weights that ran
    frames: int | None = None        # timed frames (after warm-up)
    fps: float | None = None         # 1 / median frame time
    p50_ms: float | None = None
    p95_ms: float | None = None
    cpu_ms: float | None = None      # median CPU time of this process per frame (CPU rows): load-independent-ish
    peak_mib: float | None = None    # RSS peak (CPU) or CUDA max allocated (GPU), MiB
    value: str = ""                  # the bench's own figure: ratio, growth, share of a step
    target: str = ""
    result: str = ""                 # PASS | FAIL | "" (no target) | "not measured (...)"
    note: str = ""


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr with the time since the bench started: a full run takes minutes, the table comes last."""
    print(f"[bench {time.monotonic() - _STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


def announce(row: Row) -> Row:
    """:func:`progress` for a row just measured, with its main figure; returns the row."""
    figures = [f"{row.fps:.2f} fps"] if row.fps else []
    progress(f"{row.bench} {row.device} {row.input}: " + "; ".join(figures + ([row.value] if row.value else [])))
    return row


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def speed_target(device: str, precision: str, size: str) -> float | None:
    return SPEED_TARGETS_FPS.get((device, precision, size))


def speed_target_text(fps: float, device: str) -> str:
    return f">= {fps:g} fps" + (" (H100)" if device == "cuda" else " (2 cores)")


def not_measured(bench: str, device: str, input: str, checkpoint: str, reason: str, target: str = "") -> Row:
    """A row for something this machine cannot measure (no GPU, no CUDA onnxruntime): shown, never silently left
    out, so the table always has the same shape and the GPU targets stay visible."""
    return Row(bench, device, input, checkpoint, target=target, result=reason)


_COLUMNS = [  # (header, Row field, format)
    ("bench", "bench", "{}"), ("device", "device", "{}"), ("input", "input", "{}"), ("n", "frames", "{:d}"),
    ("fps", "fps", "{:.2f}"), ("p50 ms", "p50_ms", "{:.1f}"), ("p95 ms", "p95_ms", "{:.1f}"),
    ("cpu ms", "cpu_ms", "{:.0f}"), ("peak MiB", "peak_mib", "{:.0f}"), ("value", "value", "{}"),
    ("target", "target", "{}"), ("result", "result", "{}"), ("checkpoint", "checkpoint", "{}"), ("note", "note", "{}"),
]


def _cell(row: Row, field: str, fmt: str) -> str:
    value = getattr(row, field)
    return "" if value is None or value == "" else fmt.format(value)


def format_table(rows: list[Row]) -> str:
    """Plain-text table, columns sized to their content, empty columns dropped."""
    cols = [(h, f, fmt) for h, f, fmt in _COLUMNS if any(_cell(r, f, fmt) for r in rows)]
    cells = [[_cell(r, f, fmt) for _, f, fmt in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(cols)]
    numeric = {"frames", "fps", "p50_ms", "p95_ms", "cpu_ms", "peak_mib"}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if cols[i][1] in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [line([h for h, _, _ in cols]), "  ".join("-" * w for w in widths)]
    previous = None
    for row, values in zip(rows, cells):
        if previous is not None and row.bench != previous:
            out.append("")
        out.append(line(values))
        previous = row.bench
    return "\n".join(out)


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(items: list[dict]) -> list[Row]:
    names = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in item.items() if k in names}) for item in items]
