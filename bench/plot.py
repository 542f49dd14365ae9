# SPDX-License-Identifier: GPL-3.0-or-later
"""The PNG beside the JSON: four small panels drawn from the table's rows (matplotlib, Agg, no display needed).

speed per resolution and device (with the targets), peak memory against clip length, the service and RVM
ratios, and the per-module breakdown. Kept small (about 1000x700 px) because the results are committed.
``python -m bench.plot bench/results/cpu.json`` draws a recorded JSON's PNG again (after a change here).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.report import Row, SPEED_TARGETS_FPS, rows_from_json


def _measured(rows: list[Row], bench: str) -> list[Row]:
    return [r for r in rows if r.bench == bench and not r.result.startswith("not measured")]


def _speed(ax, rows: list[Row]) -> None:
    speed = [r for r in _measured(rows, "speed") if r.fps]
    sizes = list(dict.fromkeys(r.input for r in speed))
    devices = list(dict.fromkeys(r.device for r in speed))
    width = 0.8 / max(1, len(devices))
    for k, device in enumerate(devices):
        xs, ys = zip(*[(sizes.index(r.input) + k * width, r.fps) for r in speed if r.device == device])
        ax.bar(xs, ys, width, label=device)
    for (device, precision, size), fps in SPEED_TARGETS_FPS.items():
        for i, label in enumerate(sizes):
            if label.split()[0] == size and f"{device} {precision}" in devices:
                ax.hlines(fps, i - 0.1, i + 0.9, colors="k", linestyles="--", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [s.replace(" ", "\n") for s in sizes],
                  fontsize=7)
    ax.set_ylabel("fps (median)")
    ax.set_title("speed (dashed: target)", fontsize=9)
    if devices:
        ax.legend(fontsize=7)


def _memory(ax, rows: list[Row]) -> None:
    memory = [r for r in _measured(rows, "memory") if r.peak_mib]
    for device in dict.fromkeys(r.device for r in memory):
        pts = [(r.frames, r.peak_mib) for r in memory if r.device == device]
        ax.plot(*zip(*pts), marker="o", label=device)
    if memory:
        lengths = sorted({r.frames for r in memory})
        ax.set_xscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    ax.set_xlabel("clip length (frames)")
    ax.set_ylabel("peak MiB")
    ax.set_title("peak memory vs clip length", fontsize=9)


def _ratio(value: str) -> float | None:
    m = re.search(r"x(\d+(?:\.\d+)?)", value)
    return float(m.group(1)) if m else None


def _ratio_label(r: Row) -> str:
    """One line per bar: "hop 1920x1080 ds0.25 f16 x2 ipc (cuda fp16)", "RVM torch 512x288 ds1 (cuda fp32)"."""
    if r.bench == "service":
        return f"hop {r.input} ({r.device})"
    return f"RVM {'torch' if 'torch' in r.checkpoint else 'ONNX'} {r.input} ({r.device})"


def _ratios(ax, rows: list[Row]) -> None:
    bars = [(r.bench, _ratio_label(r), _ratio(r.value))
            for r in _measured(rows, "service") + _measured(rows, "rvm")]
    bars = [b for b in bars if b[2] is not None]
    if bars:   # horizontal: the labels are long (a GPU run has ~20 bars)
        benches, labels, values = zip(*bars)
        ax.barh(range(len(values)), values, color=["tab:orange" if b == "service" else "tab:green" for b in benches])
        ax.set_yticks(range(len(values)), labels, fontsize=max(4, min(7, 120 // len(values))))
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" x{v:.2f}", va="center", fontsize=max(4, min(6, 110 // len(values))))
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.axvline(1.1, color="k", linewidth=0.8, linestyle="--")
    ax.set_title("service/in-process time (orange; dashed: +10 % target), OAVM/RVM fps (green)", fontsize=8)


def _breakdown(ax, rows: list[Row]) -> None:
    prof = _measured(rows, "profile")
    items = []
    for r in prof:
        m = re.match(r"([\d.]+) ms/step", r.value)
        if m:
            items.append((r.input.split(": ", 1)[-1], float(m.group(1))))
    if items:
        names, ms = zip(*items)
        ax.barh(range(len(ms)), ms, color="tab:purple")
        ax.set_yticks(range(len(ms)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"where a step's time goes ({prof[0].device}, {prof[0].input.split(':')[0]})", fontsize=9)
    ax.set_xlabel("ms per step (profiled)")


def write_plot(rows: list[Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    _speed(axes[0, 0], rows)
    _memory(axes[0, 1], rows)
    _ratios(axes[1, 0], rows)
    _breakdown(axes[1, 1], rows)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_title(meta: dict) -> str:
    return (f"OAVM bench - {meta['machine']['gpu'] or meta['machine']['cpu']} - {meta['checkpoint']['label']} - "
            f"{meta['started'][:10]}")


def main(argv: list[str]) -> int:
    """Draw each given bench JSON's PNG again, beside it."""
    if not argv:
        print("usage: python -m bench.plot RESULT.json [...]", file=sys.stderr)
        return 2
    for name in argv:
        path = Path(name)
        recorded = json.loads(path.read_text())
        print(write_plot(rows_from_json(recorded["rows"]), path.with_suffix(".png"), plot_title(recorded["meta"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
