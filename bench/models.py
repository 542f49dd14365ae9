# SPDX-License-Identifier: GPL-3.0-or-later
"""Which weights the benches run and how they open an engine on a device.

Until the shipped checkpoint exists the benches time a randomly initialised full-size ``OAVMConfig()`` network:
the same layers and shapes, so the same speed and memory; the table says so in its checkpoint column.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from bench.common import DeviceSpec, Resolution

CHOICES = ("auto", "shipped", "random", "random-tiny")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file on disk (the service needs a path too) and how the table names it."""

    path: Path
    label: str        # short, for the table's checkpoint column
    detail: str       # long, for the JSON record
    sha256: str


def _random_checkpoint(path: Path, tiny: bool) -> Path:
    """Write a seeded random-init network so the in-process engine and the service load the very same weights."""
    import torch

    from oavm_service.checkpoint import save_checkpoint
    from oavm_service.model import OAVM, OAVMConfig

    torch.manual_seed(0)
    model = OAVM(OAVMConfig.tiny() if tiny else OAVMConfig()).eval()
    save_checkpoint(path, model, meta={"name": "bench-random-init" + ("-tiny" if tiny else "")},
                    dtype=torch.float32)
    return path


def resolve_checkpoint(choice: str, workdir: Path) -> Checkpoint:
    """``auto``: the shipped checkpoint if present, else a random full-size network; ``shipped``, ``random``,
    ``random-tiny`` (tests) or the path of a ``.safetensors`` checkpoint."""
    from oavm_service.checkpoint import DEFAULT_CHECKPOINT, checkpoint_sha256

    if choice == "auto":
        choice = "shipped" if DEFAULT_CHECKPOINT.exists() else "random"
    if choice == "shipped":
        if not DEFAULT_CHECKPOINT.exists():
            raise FileNotFoundError(f"the shipped checkpoint {DEFAULT_CHECKPOINT} is not there yet; run with "
                                    f"--checkpoint random (same speed) or pass a checkpoint file")
        choice = str(DEFAULT_CHECKPOINT)
    if choice in ("random", "random-tiny"):
        tiny = choice == "random-tiny"
        path = _random_checkpoint(Path(workdir) / f"bench-{choice}.safetensors", tiny)
        what = "OAVMConfig.tiny()" if tiny else "full-size OAVMConfig()"
        return Checkpoint(path, f"{choice} init", f"randomly initialised {what} (seed 0); speed and memory as "
                          f"trained weights, mattes meaningless", checkpoint_sha256(path))
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .safetensors file or one of "
                                f"{', '.join(CHOICES)}")
    sha = checkpoint_sha256(path)
    return Checkpoint(path, f"{path.stem} {sha[:8]}", f"{path} (sha256 {sha})", sha)


def open_engine(ckpt: Checkpoint, spec: DeviceSpec, *, cuda_graphs: bool = True):
    """``Engine.from_checkpoint`` on ``spec`` (the engine applies the precision with autocast); ``cuda_graphs``
    False: eager GPU steps instead of the engine's default CUDA graphs."""
    from oavm_service.engine import Engine

    return Engine.from_checkpoint(ckpt.path, device=spec.device, precision=spec.precision,
                                  cuda_graphs=None if cuda_graphs else False)


def bench_session(engine, res: Resolution):
    """A new clip session at ``res``'s downsample ratio, mattes only: what the service runs unless a clip asks
    for the foreground colour (``want_foreground``), so every bench times the product's default step."""
    return engine.new_session(downsample_ratio=res.downsample_ratio, foreground=False)


def free_memory(device: str) -> None:
    """Give a dropped engine's memory back before the next device is measured (call once it is unreferenced)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
