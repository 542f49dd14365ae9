# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m bench``: run the benchmarks, print one table, record it in bench/results/ as JSON and PNG.

Rows for a device this machine lacks (CUDA without a GPU) are printed as "not measured", so the targets for the
GPU stay in the table. Nothing here is asserted: targets are reported as PASS/FAIL per row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The engine as the product runs it: the ``oavm`` command (cli.py) sets this for the service, the farm batch and the
# demo before torch is imported; without it the bench's in-process rows spun (active waiting) where the service
# slept. Before any import of torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import NO_GPU, REPO, RESULTS_DIR, DeviceSpec, Resolution, RunOptions, one_spec_per_device, \
    parse_lengths
from bench.report import SERVICE_TARGET_SIZE, Row, format_table, rows_to_json
from oavm_service.errors import OAVMError
from oavm_service.heap import keep_freed_memory

DEFAULT_RESOLUTIONS = "512x288@1,512x288@0.5,1920x1080@0.25,3840x2160@0.125"
DEFAULT_DEVICES = "cpu,cuda"
DEFAULT_LENGTHS = "100,1000,5000"
# --quick: a sanity run of a few minutes on two CPU cores; any option given explicitly still wins
QUICK = {"frames": 8, "warmup": 2, "budget_s": 20.0, "lengths": "20,100", "profile_steps": 3,
         "resolutions": "512x288@1,1920x1080@0.25"}
FULL = {"frames": 30, "warmup": 5, "budget_s": 60.0, "lengths": DEFAULT_LENGTHS, "profile_steps": 10,
        "resolutions": DEFAULT_RESOLUTIONS}
SERVICE_MAX_PIXELS = 1920 * 1080   # the service hop is measured up to 1080p (the target is at 1080p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few frames per row, short clips, no 4K (minutes)")
    p.add_argument("--frames", type=int, help="timed frames per row after warm-up (default 30; quick 8)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 5; quick 2)")
    p.add_argument("--budget-s", type=float, help="stop timing a row after this many seconds, keeping >= 3 "
                                                  "frames (default 60; quick 20)")
    p.add_argument("--resolutions", help=f"WxH[@downsample ratio], comma separated (default {DEFAULT_RESOLUTIONS})")
    p.add_argument("--devices", default=DEFAULT_DEVICES, type=DeviceSpec.parse_list,
                   help="cpu, cuda (= cuda-fp32,cuda-fp16,cuda-bf16), or single ones such as cuda-fp16 "
                        f"(default {DEFAULT_DEVICES})")
    p.add_argument("--lengths", help=f"clip lengths for the memory bench (default {DEFAULT_LENGTHS}; quick 20,100)")
    p.add_argument("--mem-resolution", type=Resolution.parse, default=None,
                   help="frame size of the memory bench (default 512x288@1 on CUDA, 64x64@1 on CPU)")
    p.add_argument("--profile-steps", type=int, help="profiled steps for the breakdown (default 10; quick 3)")
    p.add_argument("--checkpoint", default="auto",
                   help="auto (shipped if present, else random), shipped, random (full-size random init), "
                        "random-tiny (tests) or a .safetensors path")
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: torch's, i.e. the cores)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="CUDA rows: run every step eagerly (default: the engine's CUDA graphs, as the product runs)")
    for name in ("speed", "memory", "service", "rvm", "profile", "plugins"):
        p.add_argument(f"--skip-{name}", action="store_true", help=f"leave out the {name} bench")
    p.add_argument("--service-variants-at", default=SERVICE_TARGET_SIZE, metavar="WxH",
                   help="frame size of the service rows with float16 and streamed frames (default the target's, "
                        f"{SERVICE_TARGET_SIZE}; one of --resolutions)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go (default bench/results)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.resolutions = [Resolution.parse(t) for t in args.resolutions.split(",") if t.strip()]
        args.lengths = parse_lengths(args.lengths)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not args.resolutions:
        parser.error("--resolutions is empty; write e.g. 512x288,1920x1080@0.25")
    for name in ("frames", "profile_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.budget_s <= 0:
        parser.error("--warmup must be >= 0 and --budget-s > 0")
    return args


def results_tag(specs: list[DeviceSpec], quick: bool) -> str:
    """File name stem: ``cpu`` or ``cuda-<card>``, so a GPU run does not overwrite the committed CPU record."""
    tag = "cpu"
    if any(s.device == "cuda" and not s.missing_reason() for s in specs):
        import torch

        tag = "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return tag + ("-quick" if quick else "")


def machine_info(heap_kept: bool) -> dict:
    import numpy
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, "git_commit": commit.stdout.strip() or None,
            # OpenMP's waiting policy decides whether torch's threads survive a busy machine (docs/performance.md)
            "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
            # whether freed buffers stay in the heap between steps (oavm_service/heap.py; glibc only)
            "heap_kept": heap_kept}


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Row], dict]:
    """Every bench that is not skipped; the table keeps this order (rvm uses the speed rows)."""
    from bench.breakdown import run_breakdown
    from bench.memory import run_memory
    from bench.models import resolve_checkpoint
    from bench.plugins import run_plugins
    from bench.rvm import run_rvm
    from bench.service_hop import run_service
    from bench.speed import run_speed

    opts = RunOptions(frames=args.frames, warmup=args.warmup, budget_s=args.budget_s, cuda_graphs=args.cuda_graphs)
    ckpt = resolve_checkpoint(args.checkpoint, workdir)
    rows: list[Row] = []
    extra: dict = {"checkpoint": {"path": str(ckpt.path), "label": ckpt.label, "detail": ckpt.detail,
                                  "sha256": ckpt.sha256}}
    if not args.skip_memory:   # first: a fresh process, so no earlier bench's heap sits under its peaks
        rows += run_memory(args.devices, args.mem_resolution, args.lengths, ckpt)
    if not args.skip_speed:
        rows += run_speed(args.devices, args.resolutions, ckpt, opts)
    if not args.skip_service:
        service_res = [r for r in args.resolutions if r.pixels <= SERVICE_MAX_PIXELS] or args.resolutions[:1]
        rows += run_service(args.devices, service_res, ckpt, opts, workdir, variants_at=args.service_variants_at)
    if not args.skip_rvm:
        rows += run_rvm(args.devices, args.resolutions, rows, opts)
    if not args.skip_profile:
        extra["profile"] = []
        for spec in one_spec_per_device(args.devices):
            prof_rows, raw = run_breakdown(spec, args.resolutions[0], ckpt, args.profile_steps, args.warmup)
            rows += prof_rows
            if raw:
                extra["profile"].append(raw)
    if not args.skip_plugins:   # the plug-ins' own file work per frame, at the service rows' size
        rows += run_plugins(Resolution.parse(args.service_variants_at), opts)
    return rows, extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heap_kept = keep_freed_memory()   # as the ``oavm`` command does for the service it starts: both sides alike
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="oavm-bench-") as tmp:
            rows, extra = run(args, Path(tmp))
    except (FileNotFoundError, OAVMError) as exc:   # a missing/unusable checkpoint, the sample, RVM's ONNX
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    table = format_table(rows)
    print(table, flush=True)
    tag = results_tag(args.devices, args.quick)
    meta = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "machine": machine_info(heap_kept),
        "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in vars(args).items()},
        "notes": [
            "fps = 1 / median frame time of the timed steps after warm-up; p50/p95 of the same steps",
            "peak MiB: RSS high-water mark of the measuring process (CPU), torch.cuda.max_memory_allocated (GPU)",
            f"rows marked '{NO_GPU}' ran on a machine without a GPU; their targets are for one H100",
        ],
        **extra,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{tag}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows_to_json(rows), "table": table.splitlines()},
                                    indent=1) + "\n")
    from bench.plot import plot_title, write_plot

    png_path = write_plot(rows, args.out / f"{tag}.png", plot_title(meta))
    print(f"\nwritten: {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}, "
          f"{png_path.name} ({meta['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
