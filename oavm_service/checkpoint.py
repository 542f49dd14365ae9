# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM checkpoints: one ``.safetensors`` file whose metadata carries the model config and a format version.

Metadata (all strings, as safetensors requires)::

    format          "oavm-checkpoint"
    format_version  "1"
    config          OAVMConfig.to_dict() as JSON
    oavm_version    the oavm_service version that wrote the file
    meta            free-form JSON object (training recipe, step, metrics, source weights ...)

Loading rebuilds the network from the stored config and loads the tensors strictly, so a checkpoint can never
silently half-load. Every problem becomes a :class:`CheckpointError` that says what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import CheckpointError
from .model import OAVM, OAVMConfig

FORMAT = "oavm-checkpoint"
FORMAT_VERSION = "1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "oavm_mnv3.safetensors"

_HOW_TO_CREATE = ("create one with `oavm import-rvm` (RVM's pretrained weights, no training) or `oavm train`, "
                  "or pass the path of an existing checkpoint")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a checkpoint file (identifies the exact weights in logs, status replies and session files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: OAVM, meta: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = torch.float16) -> Path:
    """Write ``model`` to ``path`` (atomically: a reader never sees a half-written file).

    ``dtype`` casts floating tensors for storage (float16 halves the file; loading always gives float32);
    ``None`` keeps them as they are. ``meta`` must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    try:
        meta_json = json.dumps(meta or {})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {exc}") from exc
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict()),
                "oavm_version": __version__, "meta": meta_json}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _missing_message(path: Path) -> str:
    if path == DEFAULT_CHECKPOINT:
        return f"the default OAVM checkpoint {path} does not exist yet: {_HOW_TO_CREATE}"
    return f"checkpoint {path} does not exist: {_HOW_TO_CREATE}"


def read_checkpoint_header(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validated metadata of a checkpoint without loading its tensors.

    Returns ``{"path", "format_version", "oavm_version", "config": OAVMConfig, "meta": dict}``.
    """
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(_missing_message(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable .safetensors file ({exc}); it is corrupt or of another "
                              f"kind - re-download or re-create it ({_HOW_TO_CREATE})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a .safetensors file but not an OAVM checkpoint (format "
                              f"{metadata.get('format')!r}); to use RVM's weights run `oavm import-rvm`")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}, this OAVM reads version "
                              f"{FORMAT_VERSION!r}; use the OAVM release that wrote it "
                              f"(oavm_version {metadata.get('oavm_version')!r}) or re-create the checkpoint")
    try:
        stored = json.loads(metadata["config"])
        if isinstance(stored, dict):  # written before the field existed: OQG's dense pixel decoder
            stored.setdefault("pixel_decoder", "full")
        config = OAVMConfig.from_dict(stored)
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unusable model config in its metadata ({exc}); "
                              f"re-create the checkpoint") from None
    return {"path": str(path), "format_version": version, "oavm_version": metadata.get("oavm_version"),
            "config": config, "meta": meta}


def load_checkpoint(path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
                    ) -> tuple[OAVM, dict[str, Any]]:
    """Build the network from the stored config, load the weights strictly (float32), return (model, meta).

    ``path=None`` loads :data:`DEFAULT_CHECKPOINT`. The model is in eval mode on ``map_location``.
    """
    from safetensors.torch import load_file

    header = read_checkpoint_header(path)
    path = Path(header["path"])
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as exc:
        raise CheckpointError(f"{path}: the tensors cannot be read ({exc}); the file is truncated or corrupt - "
                              f"re-create it ({_HOW_TO_CREATE})") from None
    model = OAVM(header["config"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        def few(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"wrong shape {few(wrong)}" if wrong else ""]
        raise CheckpointError(f"{path}: the weights do not match the model config stored in the file ("
                              + "; ".join(p for p in parts if p) + "); the file was edited or written by "
                              f"incompatible code - re-create it ({_HOW_TO_CREATE})")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), header["meta"]
