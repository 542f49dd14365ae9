# SPDX-License-Identifier: GPL-3.0-or-later
"""The plug-ins' own work per frame, beside the network's: what an artist waits for on top of a step.

With the network on a GPU (a 1080p step in about 5 ms) the files a plug-in reads and writes set the pace, so they
are measured like the network, per frame: the Nuke gizmo keying a rendered Source frame for its cache, decoding
and encoding a frame it sends as pixels, writing a cache matte (its own EXR code: Nuke's Python has no
OpenImageIO); the Blender add-on reading a half-float EXR plate and writing a matte (OpenImageIO). The inputs are
the sample clip's frames at the row's size as a Write node renders them: scene-linear half floats, Zip (16
scanlines); the matte is the sample's mask with soft edges. The rows run the plug-ins' real code on this machine's
CPU; no host is involved.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import REPO, Resolution, RunOptions, SampleClip, time_steps
from bench.report import Row, announce

sys.path.insert(0, str(REPO / "plugin_nuke"))        # the gizmo's core is a top-level package there (oavm_nuke)


def _soft(mask: np.ndarray, radius: int) -> np.ndarray:
    """A box-blurred copy of a 0/1 mask: edges as a matte has them (a hard mask compresses unlike a matte)."""
    out = mask.astype(np.float32)
    for axis in (0, 1):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (radius + 1, radius)          # this axis only: the result keeps the mask's shape
        sums = np.cumsum(np.pad(out, widths, mode="edge"), axis=axis)
        size = out.shape[axis]
        out = (np.take(sums, range(2 * radius + 1, 2 * radius + 1 + size), axis=axis)
               - np.take(sums, range(size), axis=axis)) / (2 * radius + 1)
    return out.astype(np.float32)


def run_plugins(size: Resolution, opts: RunOptions) -> list[Row]:
    """One row per piece of plug-in work at ``size``, each timed over the sample's frames in turn."""
    from oavm_nuke import analysis as nuke_analysis
    from oavm_nuke import exr as nuke_exr
    from oavm_nuke.frames import load_source, source_digest
    from oavm_service.io.images import write_image
    from plugin_blender.core.imageio import read_frame, write_matte_exr

    clip = SampleClip(size.width, size.height)
    matte = _soft(clip.mask, max(1, size.width // 200))
    n_plates = min(len(clip), 8)
    with tempfile.TemporaryDirectory(prefix="oavm-bench-plugins-") as tmp:
        plates = []
        for k in range(n_plates):   # what the gizmo's Write node renders: scene-linear half floats, Zip 16 lines
            linear = (clip.frame(k).astype(np.float32) / 255.0) ** 2.2
            plates.append(str(write_image(Path(tmp) / f"source.{k:04d}.exr", linear, ["R", "G", "B"])))
        out = Path(tmp) / "out"
        out.mkdir()
        work: list[tuple[str, Callable[[int], object], str]] = [
            ("nuke: key a Source render", lambda i: source_digest(plates[i % n_plates]),
             "exr.stored_pixels_digest: the pixel data as stored, not decoded"),
            ("nuke: a frame sent as pixels", lambda i: load_source(plates[i % n_plates]).display,
             "decoded by the gizmo's EXR reader, kept half, sRGB curve by table (shared/colour.py)"),
            ("nuke: write a cache matte", lambda i: nuke_analysis.write_matte(
                str(out / f"nuke.{i:04d}.exr"), matte, matte, nuke_exr.HALF),
             "A, R, G half, Zip level 4 on several threads (the gizmo's numpy + zlib writer)"),
            ("blender: read a plate", lambda i: read_frame(plates[i % n_plates]),
             "OpenImageIO, read as half, sRGB curve by table"),
            ("blender: write a matte", lambda i: write_matte_exr(out / f"blender.{i:04d}.exr", {"matte": matte}),
             "OpenImageIO, one half channel, Zip"),
        ]
        rows = []
        for what, step, note in work:
            timing = time_steps(lambda i: i, step, start=0, warmup=min(opts.warmup, 2), frames=opts.frames,
                                budget_s=opts.budget_s)
            rows.append(announce(Row("plugins", "cpu", f"{size.size} {what}", "-", frames=timing.n, fps=timing.fps,
                                     p50_ms=timing.p50_ms, p95_ms=timing.p95_ms, cpu_ms=timing.cpu_ms,
                                     note=note)))
    return rows
