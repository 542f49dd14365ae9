# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm train`` on tiny generated datasets in the public layouts (VideoMatte240K, DVM, BG20K, YouTube-VOS,
COCO panoptic): the loaders read what was written, and 6 steps straight equal 3 steps + ``--resume`` + 3 steps."""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest
import torch

from oavm_service.errors import OAVMInputError
from oavm_service.train import data as D
from oavm_service.train import loop

SIZE = 64


# ------------------------------------------------------------------------------------------ tiny datasets

def _write_uint8(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit JPEG/PNG, as the public datasets ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(pixels if pixels.ndim == 3 else pixels[..., None])
    spec = oiio.ImageSpec(pixels.shape[1], pixels.shape[0], pixels.shape[2], oiio.UINT8)
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), spec) and out.write_image(pixels) and out.close(), oiio.geterror()


def _write_palette_png(path: Path, indices: np.ndarray) -> None:
    """An indexed-colour PNG with the DAVIS palette (YouTube-VOS / DAVIS-2017 annotations)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = indices.shape
    palette = bytes([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row.astype(np.uint8)) for row in indices)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
                     + chunk(b"PLTE", palette) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _box(t: int, size: int = SIZE, width: int = 20, x0: int = 10) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[16:44, x0 + 3 * t: x0 + 3 * t + width] = 1.0
    return m


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("public")
    rng = np.random.default_rng(0)
    for clip in range(2):                                   # VideoMatte240K: fgr + pha
        for t in range(4):
            alpha = _box(t)
            alpha[16:44, 10 + 3 * t] = 0.5                  # a soft edge column
            _write_uint8(root / f"vm240k/train/fgr/clip{clip}/{t:04d}.jpg",
                         np.full((SIZE, SIZE, 3), [200, 60 + 80 * clip, 40], np.uint8))
            _write_uint8(root / f"vm240k/train/pha/clip{clip}/{t:04d}.jpg", np.rint(alpha * 255).astype(np.uint8))
    for t in range(5):                                      # DVM: a background video
        _write_uint8(root / f"dvm/clipA/{t:05d}.jpg", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    for i in range(2):                                      # BG20K: stills
        _write_uint8(root / f"bg20k/train/bg{i}.jpg", rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    for t in range(0, 20, 5):                               # YouTube-VOS: every 5th frame annotated
        _write_uint8(root / f"ytvos/train/JPEGImages/vid0/{t:05d}.jpg",
                     rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        if t != 15:                                         # one frame without annotation is skipped
            labels = _box(t // 5).astype(np.uint8) + 2 * _box(0, width=8, x0=50).astype(np.uint8)
            _write_palette_png(root / f"ytvos/train/Annotations/vid0/{t:05d}.png", labels)
    ids = np.zeros((SIZE, SIZE), np.int64)                  # COCO panoptic: two things, one stuff
    ids[10:30, 10:30] = 1001
    ids[35:60, 30:60] = 2002
    ids[:5] = 3003
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    _write_uint8(root / "coco/annotations/panoptic_train2017/000000000001.png", rgb)
    _write_uint8(root / "coco/train2017/000000000001.jpg", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    (root / "coco/annotations/panoptic_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg"}],
        "annotations": [{"image_id": 1, "file_name": "000000000001.png", "segments_info": [
            {"id": 1001, "category_id": 1, "iscrowd": 0, "area": 400},
            {"id": 2002, "category_id": 1, "iscrowd": 0, "area": 750},
            {"id": 3003, "category_id": 200, "iscrowd": 0, "area": 320}]}],
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 200, "name": "sky", "isthing": 0}]}))
    return root


# ------------------------------------------------------------------------------------------------ loaders

def test_loaders_read_the_public_layouts(datasets: Path):
    clips = D.videomatte_clips(datasets / "vm240k")
    assert [c.name for c in clips] == ["clip0", "clip1"] and len(clips[0].pha) == 4
    window = D.VideoMatteProvider(clips).window(0, np.random.default_rng(0), 2, (SIZE, SIZE), 1)
    assert window.fgr.shape == (2, SIZE, SIZE, 3) and window.pha.shape == (2, SIZE, SIZE)
    assert np.isclose(window.pha, 0.5, atol=0.05).any() and window.pha.max() > 0.95

    vos = D.youtubevos_videos(datasets / "ytvos")
    assert len(vos) == 1 and len(vos[0].frames) == 3                      # the unannotated frame is dropped
    labels = D.read_label_map(vos[0].masks[0])
    assert set(np.unique(labels)) == {0, 1, 2}                           # palette indices, not colours
    clip = D.VideoSegmentationSampler("vos", vos).sample(np.random.default_rng(0), 3, (SIZE, SIZE))
    assert clip.instances.shape == (3, 2, SIZE, SIZE) and clip.alpha is None

    coco = D.coco_panoptic(datasets / "coco", min_area=100)
    assert coco[0].segment_ids == [1001, 2002]                          # the "stuff" segment is not an object
    ids = D.read_panoptic(coco[0].panoptic)
    assert (ids == 1001).sum() == 400 and (ids == 2002).sum() == 750
    clip = D.ImageSegmentationSampler("coco", coco).sample(np.random.default_rng(1), 2, (SIZE, SIZE))
    assert clip.instances.shape[:2] == (2, 2) and clip.prompt.any()

    assert len(D.background_videos(datasets / "dvm")) == 1
    assert len(D.background_videos(datasets / "dvm", frames=(0, 3))[0]) == 3
    assert len(D.background_images(datasets / "bg20k", "train")) == 2


def test_loaders_explain_missing_data(datasets: Path, tmp_path: Path):
    with pytest.raises(OAVMInputError, match="panoptic_annotations"):
        D.coco_panoptic(tmp_path)
    with pytest.raises(OAVMInputError, match="does not exist"):
        D.videomatte_clips(tmp_path / "nothing")
    with pytest.raises(OAVMInputError, match="no sequence"):
        D.masked_videos(datasets / "ytvos/train", frames_dir="JPEGImages", include=["cows"])


def test_local_davis_layout_with_palette_masks():
    seqs = D.masked_videos("/work/shared/data/davis2017_lowres", include=["dogs-jump"])
    assert len(seqs) == 1 and len(seqs[0].frames) == 66
    assert set(np.unique(D.read_label_map(seqs[0].masks[0]))) == {0, 1, 2, 3}
    binary = D.masked_videos("/work/shared/data/davis2016", exclude=["cows", "dance-twirl", "scooter-black"])
    assert "cows" not in [s.name for s in binary]
    assert set(np.unique(D.read_label_map(binary[0].masks[0]))) == {0, 1}


# ------------------------------------------------------------------------------------------- training

def _recipe(datasets: Path) -> loop.Recipe:
    return loop.recipe_from_dict({
        "name": "tiny",
        "train": {"seed": 3, "init": "random", "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
                  "val_every": 0, "grad_clip": 1.0},
        "model": {"c": 32, "key_dim": 16, "num_queries": 4, "num_heads": 2, "window": 7,
                  "decoder_channels": [32, 24, 16, 16]},
        "loss": {"laplacian_levels": 3, "set_scale": 0.2},
        "datasets": {
            "vm": {"kind": "composite", "foregrounds": {"kind": "videomatte", "root": str(datasets / "vm240k")},
                   "backgrounds": [{"kind": "videos", "root": str(datasets / "dvm")},
                                   {"kind": "images", "root": str(datasets / "bg20k"), "split": "train"}]},
            "vos": {"kind": "video_seg", "layout": "youtubevos", "root": str(datasets / "ytvos")},
            "coco": {"kind": "image_seg", "root": str(datasets / "coco"), "min_area": 100},
        },
        "stages": [{"name": "s1", "datasets": {"vm": 2, "vos": 1, "coco": 1}, "size": [SIZE, SIZE],
                    "clip_length": 2, "batch_size": 1, "lr": 1e-3, "weight_decay": 0.07, "steps": 6,
                    "warmup_steps": 2}],
    })


def test_six_steps_equal_three_plus_resume_three(datasets: Path, tmp_path: Path):
    recipe = _recipe(datasets)
    cpu = torch.device("cpu")
    straight = loop.train(recipe, tmp_path / "a", device=cpu)
    first = loop.train(recipe, tmp_path / "b", device=cpu, max_steps=3)
    rest = loop.train(recipe, tmp_path / "b", device=cpu, resume=tmp_path / "b/checkpoints/last.pt")
    assert len(straight) == 6 and len(first) == 3 and len(rest) == 3
    assert first + rest == straight                      # bit-identical, not approximately equal
    assert all(np.isfinite(straight)) and len(set(straight)) > 1

    with open(tmp_path / "b/scalars.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("total")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["total"]) for r in rows] == pytest.approx(straight, rel=1e-6)
    assert (tmp_path / "b/samples/step_000003.png").is_file()

    from oavm_service.checkpoint import load_checkpoint
    exported = load_checkpoint(tmp_path / "a/final.safetensors")
    assert exported is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_training_runs_on_one_cuda_gpu_with_mixed_precision_and_resumes(datasets: Path, tmp_path: Path):
    """The recipe as it runs on a GPU: fp16 autocast + GradScaler, --resume from the GPU run's last.pt, and an
    exported checkpoint that the engine runs on the GPU. (Bit-identical resumption is checked on the CPU above;
    cuDNN's autotuned kernels need not repeat their sums exactly.)"""
    recipe = _recipe(datasets)
    gpu = torch.device("cuda")
    first = loop.train(recipe, tmp_path, device=gpu, max_steps=3)
    rest = loop.train(recipe, tmp_path, device=gpu, resume=tmp_path / "checkpoints/last.pt")
    assert len(first) == 3 and len(rest) == 3 and all(np.isfinite(first + rest))
    state = torch.load(tmp_path / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    assert state["scaler"] is not None, "the GradScaler state is saved for --resume"

    from oavm_service.engine import Engine
    session = Engine.from_checkpoint(tmp_path / "final.safetensors", device="cuda").new_session()
    mask = _box(0)
    frame = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    assert np.isfinite(session.step(frame, {"a": mask})["a"].alpha).all()


def test_weight_average_is_exported_and_resumes_exactly(datasets: Path, tmp_path: Path):
    """With train.ema_decay the exported weights are the running average (not the last step's weights), and a
    resumed run continues that average: 6 steps straight export the same weights as 3 + resume + 3."""
    from oavm_service.checkpoint import load_checkpoint

    recipe = _recipe(datasets)
    recipe.train.ema_decay = 0.8
    cpu = torch.device("cpu")
    loop.train(recipe, tmp_path / "a", device=cpu)
    loop.train(recipe, tmp_path / "b", device=cpu, max_steps=3)
    loop.train(recipe, tmp_path / "b", device=cpu, resume=tmp_path / "b/checkpoints/last.pt")
    straight = load_checkpoint(tmp_path / "a/final.safetensors")[0].state_dict()
    resumed = load_checkpoint(tmp_path / "b/final.safetensors")[0].state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    state = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=False)
    key = "ogcr.fuse.weight"     # trained from zero: raw and averaged weights must differ after 6 steps
    raw, avg = state["model"][key], state["ema"][key]
    assert not torch.allclose(raw, avg)
    assert torch.allclose(straight[key].float(), avg.float(), atol=1e-3)   # exported fp16 = the average

    recipe.train.ema_decay = 1.5
    with pytest.raises(OAVMInputError, match="ema_decay"):
        loop.train(recipe, tmp_path / "c", device=cpu, max_steps=1)


def test_cli_explains_a_missing_recipe(capsys):
    assert loop.main(["--config", "configs/does-not-exist.toml"]) == 2
    assert "configs/*.toml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- distillation

def test_distill_teaches_the_light_pixel_decoder_the_dense_ones_outputs(datasets: Path):
    """The student keeps every tensor it shares with the teacher except the pixel decoder's, which alone learns,
    and comes to reproduce all four outputs far better than it starts."""
    from conftest import calibrated_tiny_model
    from oavm_service.train import distill

    teacher = calibrated_tiny_model(pixel_decoder="full")   # = the tiny recipe's [model]; live activations
    assert teacher.config.to_dict() == {**teacher.config.to_dict(), **_recipe(datasets).model}
    lines: list[str] = []
    result = distill.distill_pixel_decoder(teacher, teacher.config.replace(pixel_decoder="separable"),
                                           distill.recipe_frames(_recipe(datasets), "s1", lines.append), steps=80,
                                           lr=3e-3, log=lines.append)
    assert result.student.config.pixel_decoder == "separable" and result.steps == 80
    assert "freshly initialised: oqg.pixel_decoder.conv0, oqg.pixel_decoder.conv1, oqg.pixel_decoder.conv2" \
        in lines[0]
    for name in distill.OUTPUTS:
        assert result.last_error[name] < 0.5 * result.first_error[name], (name, result.first_error, result.last_error)
    ours, theirs = result.student.state_dict(), teacher.state_dict()
    outside = [k for k in ours if not k.startswith("oqg.pixel_decoder.")]
    assert outside and all(torch.equal(ours[k], theirs[k]) for k in outside)
    assert not torch.equal(ours["oqg.pixel_decoder.lateral1.0.weight"], theirs["oqg.pixel_decoder.lateral1.0.weight"])


def test_distill_command_writes_a_checkpoint_that_initialises_training(datasets: Path, tmp_path: Path):
    """``oavm distill`` writes the student's checkpoint, says clearly when there is nothing to do or no such
    stage, and a recipe whose init is the student trains from it (every shared tensor loaded)."""
    from conftest import calibrated_tiny_model
    from oavm_service.checkpoint import load_checkpoint, save_checkpoint
    from oavm_service.train import distill

    teacher = save_checkpoint(tmp_path / "teacher.safetensors", calibrated_tiny_model(pixel_decoder="full"))
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(
        f'name = "tiny"\n[train]\nseed = 3\ninit = "{tmp_path / "student.safetensors"}"\nval_every = 0\n'
        f'[model]\nc = 32\nkey_dim = 16\nnum_queries = 4\nnum_heads = 2\nwindow = 7\n'
        f'decoder_channels = [32, 24, 16, 16]\n'
        f'[datasets.vos]\nkind = "video_seg"\nlayout = "youtubevos"\nroot = "{datasets / "ytvos"}"\n'
        f'[[stages]]\nname = "s1"\ndatasets = {{ vos = 1 }}\nsize = [{SIZE}, {SIZE}]\nclip_length = 2\n'
        f'lr = 1e-3\nsteps = 2\nwarmup_steps = 1\n')
    common = ["--config", str(recipe_file), "--steps", "3", "--device", "cpu"]
    assert distill.main(["--teacher", str(teacher), "--out", str(tmp_path / "student.safetensors"), *common]) == 0
    student, meta = load_checkpoint(tmp_path / "student.safetensors")
    assert student.config.pixel_decoder == "separable" and student.config.c == 32
    assert meta["made_by"] == "oavm distill" and meta["stage"] == "s1" and meta["steps"] == 3
    assert distill.main(["--teacher", str(tmp_path / "student.safetensors"), "--out",
                         str(tmp_path / "again.safetensors"), *common]) == 2        # already separable
    assert distill.main(["--teacher", str(teacher), "--out", str(tmp_path / "x.safetensors"), "--stage", "s9",
                         *common]) == 2                                               # no such stage
    assert not (tmp_path / "again.safetensors").exists() and not (tmp_path / "x.safetensors").exists()

    recipe = loop.load_recipe(recipe_file)
    recipe.model["pixel_decoder"] = "separable"
    losses = loop.train(recipe, tmp_path / "run", device=torch.device("cpu"))
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "tensors loaded; freshly initialised: set_prediction; 0 unused" in (tmp_path / "run/train.log").read_text()
