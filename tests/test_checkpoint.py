# SPDX-License-Identifier: GPL-3.0-or-later
"""Checkpoint files: round trip, storage dtype, and a clear CheckpointError for every kind of bad file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oavm_service.checkpoint import (DEFAULT_CHECKPOINT, checkpoint_sha256, load_checkpoint, read_checkpoint_header,
                                     save_checkpoint)
from oavm_service.errors import CheckpointError
from oavm_service.model import OAVM, OAVMConfig


def _rewrite(src, dst, *, metadata_changes=None, drop=(), tensors_from=None):
    """Copy a checkpoint with edited metadata / tensors (to build the bad files a user may meet)."""
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors_from is not None:
        tensors = {k: v.contiguous() for k, v in tensors_from.state_dict().items()}
    for k in drop:
        tensors.pop(k)
    metadata.update(metadata_changes or {})
    save_file(tensors, str(dst), metadata={k: v for k, v in metadata.items() if v is not None})
    return dst


@pytest.fixture
def saved(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, meta={"name": "unit", "step": 3}, dtype=None)
    return path, tiny_model


def test_round_trip_fp32_is_exact(saved):
    path, model = saved
    loaded, meta = load_checkpoint(path)
    assert meta == {"name": "unit", "step": 3}
    assert loaded.config == model.config and not loaded.training
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    frames, mask = torch.rand(1, 2, 3, 48, 64), torch.zeros(1, 1, 48, 64)
    mask[..., 10:30, 20:40] = 1
    with torch.inference_mode():
        torch.testing.assert_close(loaded.forward_clip(frames, mask)["alpha"], model.forward_clip(frames, mask)["alpha"],
                                   rtol=0, atol=0)
    header = read_checkpoint_header(path)
    assert header["format_version"] == "1" and header["config"] == model.config


def test_fp16_storage_loads_as_float32(tmp_path, tiny_model):
    p16 = save_checkpoint(tmp_path / "half.safetensors", tiny_model)  # default dtype float16
    p32 = save_checkpoint(tmp_path / "full.safetensors", tiny_model, dtype=None)
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    loaded, _ = load_checkpoint(p16)
    ref = tiny_model.state_dict()
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            assert torch.equal(v, ref[k].half().float()), k
        else:
            assert torch.equal(v, ref[k]), k


def test_sha256(saved):
    path, _ = saved
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(CheckpointError, match="oavm import-rvm"):
        load_checkpoint(tmp_path / "nope.safetensors")
    assert DEFAULT_CHECKPOINT.name == "oavm_mnv3.safetensors"


def test_other_format_version_is_refused(saved, tmp_path):
    bad = _rewrite(saved[0], tmp_path / "v2.safetensors", metadata_changes={"format_version": "2"})
    with pytest.raises(CheckpointError, match="format version '2'"):
        load_checkpoint(bad)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not an OAVM checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_refused(saved, tmp_path, damage):
    data = saved[0].read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    bad.write_bytes(b"\x00not a checkpoint at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)


def test_config_mismatch_is_refused(saved, tmp_path):
    path, _ = saved
    # tensors of the tiny model under the default config's metadata
    wrong_cfg = _rewrite(path, tmp_path / "cfg.safetensors",
                         metadata_changes={"config": json.dumps(OAVMConfig().to_dict())})
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_checkpoint(wrong_cfg)
    # a tensor missing
    missing = _rewrite(path, tmp_path / "missing.safetensors", drop=["pfe.out.weight"])
    with pytest.raises(CheckpointError, match="missing pfe.out.weight"):
        load_checkpoint(missing)
    # training heads stored but config without them
    heads = OAVM(OAVMConfig.tiny(train_heads=True))
    extra = _rewrite(path, tmp_path / "extra.safetensors", tensors_from=heads)
    with pytest.raises(CheckpointError, match="unexpected set_prediction"):
        load_checkpoint(extra)
    # an unknown config field (e.g. written by a newer OAVM)
    newer = _rewrite(path, tmp_path / "newer.safetensors",
                     metadata_changes={"config": json.dumps({**OAVMConfig.tiny().to_dict(), "fancy": 1})})
    with pytest.raises(CheckpointError, match="unknown OAVMConfig field"):
        load_checkpoint(newer)


def test_checkpoint_from_before_the_pixel_decoder_field_builds_the_dense_one(tmp_path):
    """Checkpoints written before ``OAVMConfig.pixel_decoder`` existed had dense 3x3 convolutions there: they
    must still load (as "full"), not be read as the new default and refused."""
    torch.manual_seed(0)
    dense = OAVM(OAVMConfig.tiny(pixel_decoder="full")).eval()
    path = save_checkpoint(tmp_path / "dense.safetensors", dense, dtype=None)
    old_config = {k: v for k, v in dense.config.to_dict().items() if k != "pixel_decoder"}
    old = _rewrite(path, tmp_path / "old.safetensors", metadata_changes={"config": json.dumps(old_config)})
    model, _ = load_checkpoint(old)
    assert model.config.pixel_decoder == "full"
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in model.state_dict().items())


def test_config_json_round_trip_and_validation():
    cfg = OAVMConfig.tiny(backbone="resnet50")
    assert OAVMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="window must be a positive odd integer"):
        OAVMConfig(window=4)
    with pytest.raises(ValueError, match="backbone must be one of"):
        OAVMConfig(backbone="vgg")


def test_shipped_checkpoint_mattes_the_sample_clip():
    """The checkpoint in the repo loads with the engine and follows the prompt on real footage (samples/judo)."""
    import OpenImageIO as oiio

    from oavm_service.engine import Engine

    sample = Path(__file__).resolve().parents[1] / "samples" / "judo"
    engine = Engine.from_checkpoint(None, device="cpu")
    assert engine.checkpoint_info["sha256"] == checkpoint_sha256(DEFAULT_CHECKPOINT)
    session = engine.new_session()
    mask = (oiio.ImageBuf(str(sample / "masks" / "00000.png")).get_pixels(oiio.FLOAT)[..., 0] > 0)[::2, ::2]
    ious = []
    for i in range(3):
        frame = oiio.ImageBuf(str(sample / "frames" / f"{i:05d}.jpg")).get_pixels(oiio.FLOAT)[::2, ::2, :3]
        mattes = session.step(frame.copy(), {"judoka": mask.astype(np.float32)} if i == 0 else None)
        alpha = mattes["judoka"].alpha
        assert alpha.shape == mask.shape and 0.0 <= alpha.min() and alpha.max() <= 1.0
        ious.append(np.logical_and(alpha > 0.5, mask).sum() / np.logical_or(alpha > 0.5, mask).sum())
    assert min(ious) > 0.5, ious
