# SPDX-License-Identifier: GPL-3.0-or-later
"""Interleaved A/B of the engine's GPU variants: which of them pays off, measured in one run on one card.

    python -m bench.cuda_ab [--resolutions 1920x1080@0.25,3840x2160@0.125] [--rounds 60] [--json ab.json]

Every variant gets its own engine and clip session on the bundled sample clip; each round steps every variant on
the same frame, in turn, so a card or host that changes speed during the run changes all variants alike. Per
variant: median step time (``ClipSession.step``, frame in and mattes out as numpy, ``torch.cuda.synchronize``
inside the clock), fps, the ratio to the first variant, and the largest and mean alpha difference from the fp32
eager engine on the same frames (each variant runs its own clip, so differences carry over frames).

Variants: eager / CUDA graphs (``Engine(cuda_graphs=...)``) x fp32 / fp16 / bf16 autocast; fp16 with the weights
kept in fp32 (the engine stores them in fp16 on CUDA, so that autocast has no weight to cast per frame); results
copied back through pageable instead of page-locked memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.common import OBJECT_ID, Resolution, SampleClip, cuda_sync

DEFAULT_RESOLUTIONS = "512x288@1,1920x1080@0.25,3840x2160@0.125"


@dataclass
class Variant:
    name: str
    precision: str
    cuda_graphs: bool = False
    fp32_weights: bool = False
    pageable: bool = False
    times: list[float] = field(default_factory=list)
    max_diff: float = 0.0
    mean_diffs: list[float] = field(default_factory=list)
    error: str | None = None     # a variant that fails is reported and dropped, the others go on


VARIANTS = [
    Variant("graphs fp16 (default)", "fp16", cuda_graphs=True),
    Variant("graphs fp16, pageable", "fp16", cuda_graphs=True, pageable=True),
    Variant("graphs fp16, fp32 weights", "fp16", cuda_graphs=True, fp32_weights=True),
    Variant("graphs bf16", "bf16", cuda_graphs=True),
    Variant("graphs fp32", "fp32", cuda_graphs=True),
    Variant("eager fp16", "fp16"),
    Variant("eager fp16, fp32 weights", "fp16", fp32_weights=True),
    Variant("eager fp32", "fp32"),
]


def run(resolution: Resolution, rounds: int, warmup: int, checkpoint: str | None, device: str = "cuda"
        ) -> list[dict]:
    from oavm_service.engine import Engine

    sync = cuda_sync(device)
    clip = SampleClip(resolution.width, resolution.height)
    variants = [Variant(v.name, v.precision, v.cuda_graphs, v.fp32_weights, v.pageable) for v in VARIANTS]
    reference = Engine.from_checkpoint(checkpoint, device=device, precision="fp32", cuda_graphs=False).new_session(
        downsample_ratio=resolution.downsample_ratio, foreground=False)
    sessions: list = []
    for v in variants:
        try:
            engine = Engine.from_checkpoint(checkpoint, device=device, precision=v.precision,
                                            cuda_graphs=v.cuda_graphs)
            if v.fp32_weights:
                engine.model.float()
            if v.pageable:
                engine.pinned_transfers = False
            sessions.append(engine.new_session(downsample_ratio=resolution.downsample_ratio, foreground=False))
        except Exception as exc:  # noqa: BLE001 - report any failure of one variant and measure the rest
            v.error = f"{type(exc).__name__}: {exc}"
            sessions.append(None)
    prompt = {OBJECT_ID: clip.mask}
    for i in range(0, 1 + warmup + rounds):
        frame = clip.frame(i)
        ref = reference.step(frame, prompt if i == 0 else None)[OBJECT_ID].alpha
        for k, (v, s) in enumerate(zip(variants, sessions)):
            if s is None:
                continue
            try:
                sync()
                t0 = time.perf_counter()
                alpha = s.step(frame, prompt if i == 0 else None)[OBJECT_ID].alpha
                sync()
                dt = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001
                v.error, sessions[k] = f"frame {i}: {type(exc).__name__}: {exc}", None
                continue
            if i > warmup:
                v.times.append(dt)
            diff = np.abs(alpha - ref)
            v.max_diff = max(v.max_diff, float(diff.max()))
            v.mean_diffs.append(float(diff.mean()))
    timed = [v for v in variants if v.times]
    base = statistics.median(timed[0].times) if timed else float("nan")
    out = []
    for v in variants:
        if not v.times:
            out.append({"resolution": resolution.label, "variant": v.name, "error": v.error or "no timed step"})
            continue
        med = statistics.median(v.times)
        out.append({"resolution": resolution.label, "variant": v.name, "median_ms": med * 1e3, "fps": 1.0 / med,
                    "vs_first": med / base, "p95_ms": float(np.percentile(v.times, 95)) * 1e3,
                    "max_alpha_diff": v.max_diff, "mean_alpha_diff": float(np.mean(v.mean_diffs)),
                    "rounds": len(v.times), "error": v.error})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default=DEFAULT_RESOLUTIONS)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checkpoint", default=None, help="a .safetensors file (default: the shipped checkpoint)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script where there is no GPU")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to compare (--device cpu tries the script on the CPU)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{gpu}  torch {torch.__version__}", flush=True)
    rows = []
    for text in args.resolutions.split(","):
        res = Resolution.parse(text)
        t0 = time.perf_counter()
        rows += run(res, args.rounds, args.warmup, args.checkpoint, args.device)
        print(f"{text}: {time.perf_counter() - t0:.1f} s", flush=True)
        for r in rows[-len(VARIANTS):]:
            if "median_ms" not in r:
                print(f"  {r['variant']:<28} FAILED: {r['error']}", flush=True)
                continue
            print(f"  {r['variant']:<28} {r['median_ms']:7.2f} ms  {r['fps']:7.1f} fps  x{r['vs_first']:.2f}  "
                  f"p95 {r['p95_ms']:6.2f}  alpha diff max {r['max_alpha_diff']:.4f} mean {r['mean_alpha_diff']:.5f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
