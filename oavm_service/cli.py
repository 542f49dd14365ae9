"""The ``oavm`` command: one sub-command per job, each implemented by its own module's ``main(argv)``.

Sub-command modules are imported lazily so that ``oavm serve --help`` does not pay for importing training code.
"""
from __future__ import annotations

import importlib
import os
import sys

from oavm_service.heap import keep_freed_memory

# OpenMP threads that spin while waiting make torch many times slower when the CPU is shared (measured in bench/:
# 4.3 s vs 0.41 s per 512x288 frame on a busy 2-core machine); artists run the service beside Blender or Nuke.
# Must be set before torch is imported, which the sub-commands do lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("oavm_service.server", "run the local OAVM service (ZeroMQ, 127.0.0.1 by default)"),
    "keygen": ("oavm_service.server", "make CURVE keys for a service that listens beyond loopback"),
    "batch": ("oavm_service.batch", "matte an image sequence or movie headlessly (render farms)"),
    "demo": ("oavm_service.demo", "matte the bundled sample clip and write a preview"),
    "train": ("oavm_service.train.loop", "train from a recipe file (configs/*.toml)"),
    "pack-data": ("oavm_service.train.pack", "pack a recipe's training data into one small folder (GPU runs)"),
    "eval": ("oavm_service.train.evaluate", "evaluate a checkpoint: MAD, MSE, Grad, Conn, dtSSD, J, F"),
    "import-rvm": ("oavm_service.train.import_rvm", "load RVM's pretrained weights (ONNX) into an OAVM checkpoint"),
    "distill": ("oavm_service.train.distill", "move a trained checkpoint to the light pixel decoder (distillation)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: oavm <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    keep_freed_memory()   # the network's per-step buffers are reused instead of re-faulted (heap.py)
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "main_" + name.replace("-", "_"), None) or module.main
    return int(entry(rest) or 0)
