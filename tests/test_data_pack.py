# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm pack-data`` and ``oavm train --data-pack``: a recipe's data packed here trains where neither the source
footage nor the teacher cache exists; recipes that extend others; the batch prefetch draws the same batches."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from oavm_service.errors import OAVMInputError
from oavm_service.train import data as D
from oavm_service.train import loop, pack
from tests.test_train_resume import _recipe, _write_palette_png, _write_uint8, datasets  # noqa: F401 (fixture)

H, W = 48, 64


class _FakeTeacher:
    """Stands in for RVM: a soft vertical ramp of alpha, so that pseudo-alpha has edges to keep."""

    class _Result:
        def __init__(self, alpha):
            self.alpha = alpha

    def __call__(self, frames: np.ndarray):
        ramp = np.linspace(0.0, 1.0, frames.shape[2], dtype=np.float32)
        return self._Result(np.broadcast_to(ramp, frames.shape[:3]).copy())


def _davis_like(root: Path, rng: np.random.Generator) -> None:
    """Three sequences in the DAVIS layout (frames/*.jpg, palette masks/*.png), one of them with two objects."""
    for seq, n_objects in (("walk", 1), ("pair", 2), ("held", 1)):
        for t in range(4):
            _write_uint8(root / "davis" / seq / "frames" / f"{t:05d}.jpg",
                         rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
            labels = np.zeros((H, W), np.uint8)
            labels[10:40, 5 + 2 * t:30 + 2 * t] = 1
            if n_objects == 2:
                labels[5:20, 40:60] = 2
            _write_palette_png(root / "davis" / seq / "masks" / f"{t:05d}.png", labels)
    for t in range(6):
        _write_uint8(root / "bedroom" / f"{t:05d}.jpg", rng.integers(0, 255, (H + 20, W + 30, 3), dtype=np.uint8))


def _pack_recipe(root: Path, cache: Path) -> loop.Recipe:
    source = {"name": "davis", "root": str(root / "davis"), "exclude": ["held"]}
    return loop.recipe_from_dict({
        "name": "packed",
        "train": {"seed": 1, "init": "random", "log_every": 1, "checkpoint_every": 0, "sample_every": 0,
                  "val_every": 0, "cache_dir": str(cache)},
        "model": {"c": 32, "key_dim": 16, "num_queries": 4, "num_heads": 2, "window": 7,
                  "decoder_channels": [32, 24, 16, 16]},
        "loss": {"laplacian_levels": 3, "set_scale": 0.2},
        "datasets": {
            "comp": {"kind": "composite", "foregrounds": {"kind": "teacher", "sources": [source]},
                     "backgrounds": [{"kind": "videos", "root": str(root / "bedroom"), "frames": [0, 4]}]},
            "real": {"kind": "real", "sources": [source]},
        },
        "stages": [{"name": "s", "datasets": {"comp": 1, "real": 1}, "size": [H, W], "clip_length": 2,
                    "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "steps": 3, "warmup_steps": 1}],
    })


@pytest.fixture()
def packed(tmp_path: Path):
    """(recipe, pack folder, what the teacher cache gives in place) with the sources then moved away."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    _davis_like(root, np.random.default_rng(0))
    recipe = _pack_recipe(root, cache)
    teacher = D.TeacherCache(cache, teacher_factory=_FakeTeacher)       # fill the cache as RVM would
    in_place = {s.name: teacher.load("davis", s, (H, W)) for s in D.masked_videos(root / "davis", exclude=["held"])}
    backgrounds = [D.load_rgb(p, (H, W)) for p in D.background_videos(root / "bedroom", frames=(0, 4))[0]]
    manifest = pack.write_pack(recipe, tmp_path / "pack", log=lambda _: None)
    assert sum(len(v) for v in manifest["sources"].values()) == 2      # the held-out sequence stays out
    shutil.rmtree(root)                                                   # the other machine has neither the
    shutil.rmtree(cache)                                                  # footage nor the teacher cache
    return recipe, tmp_path / "pack", in_place, backgrounds


def test_a_pack_gives_the_sequences_and_backgrounds_the_cache_gave(packed):
    recipe, folder, in_place, backgrounds = packed
    data = pack.DataPack(folder)
    item = recipe.datasets["real"]["sources"][0]
    got = {s.name: s for s in data.sequences(item, (H, W))}
    assert sorted(got) == ["pair", "walk"]
    for name, ref in in_place.items():
        seq = got[name]
        assert seq.object_ids == ref.object_ids and seq.frames.dtype == np.uint8
        assert np.array_equal(seq.labels, ref.labels)                    # PNG: exact
        assert np.array_equal(seq.alpha, ref.alpha)                      # the same whole-object alpha
        assert 0 < seq.alpha.max() and ((seq.alpha > 0) & (seq.alpha < 255)).any()   # soft edges kept
        error = np.abs(seq.frames.astype(int) - ref.frames)
        assert error.mean() < 12                                         # JPEG of noise: the worst case
    videos = data.background_videos(recipe.datasets["comp"]["backgrounds"][0], (H, W))
    assert len(videos) == 1 and len(videos[0]) == 4
    for path, ref in zip(videos[0], backgrounds):
        assert np.abs(D.load_rgb(path, (H, W)).astype(int) - ref).mean() < 12


def test_training_from_a_pack_needs_neither_footage_nor_teacher(packed, tmp_path: Path):
    recipe, folder, _, _ = packed
    recipe.train.data_pack = str(folder)
    losses = loop.train(recipe, tmp_path / "run", device=torch.device("cpu"))
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (tmp_path / "run/final.safetensors").is_file()

    recipe.datasets["real"]["sources"] = [{"name": "davis", "root": "/elsewhere/davis"}]
    with pytest.raises(OAVMInputError, match="oavm pack-data"):        # not in the pack: say how to fix it
        loop.train(recipe, tmp_path / "run2", device=torch.device("cpu"), max_steps=1)
    with pytest.raises(OAVMInputError, match="not a data pack"):
        pack.DataPack(tmp_path)


def test_pack_refuses_what_it_cannot_pack(datasets: Path, tmp_path: Path):
    recipe = _recipe(datasets)                  # VideoMatte240K, YouTube-VOS and COCO are trained on in place
    with pytest.raises(OAVMInputError, match="cannot be packed"):
        pack.write_pack(recipe, tmp_path / "pack", log=lambda _: None)
    recipe.stages[0].datasets = {"vm": 1}
    with pytest.raises(OAVMInputError, match="videomatte foregrounds cannot be packed"):
        pack.write_pack(recipe, tmp_path / "pack", log=lambda _: None)


def test_prefetched_batches_train_exactly_as_batches_drawn_in_line(datasets: Path, tmp_path: Path):
    recipe = _recipe(datasets)
    recipe.train.prefetch = False
    in_line = loop.train(recipe, tmp_path / "a", device=torch.device("cpu"), max_steps=4)
    recipe.train.prefetch = True
    prefetched = loop.train(recipe, tmp_path / "b", device=torch.device("cpu"), max_steps=4)
    assert prefetched == in_line and len(set(in_line)) > 1


def test_a_recipe_extends_another(tmp_path: Path):
    (tmp_path / "base.toml").write_text(
        'name = "base"\nvalidation = ["v"]\n[train]\nseed = 4\nlog_every = 7\n'
        '[datasets.v]\nkind = "real"\nsources = [{ root = "a" }]\n'
        '[[stages]]\nname = "one"\ndatasets = { v = 1 }\nsize = [32, 32]\nsteps = 9\n')
    (tmp_path / "gpu.toml").write_text(
        'extends = "base.toml"\nname = "gpu"\n[train]\nseed = 5\n'
        '[[stages]]\nname = "two"\ndatasets = { v = 1 }\nsize = [64, 64]\nsteps = 3\nbatch_size = 8\n')
    recipe = loop.load_recipe(tmp_path / "gpu.toml")
    assert recipe.name == "gpu" and recipe.train.seed == 5 and recipe.train.log_every == 7   # tables merge
    assert [s.name for s in recipe.stages] == ["two"] and recipe.stages[0].batch_size == 8    # arrays replace
    assert recipe.datasets["v"]["sources"] == [{"root": "a"}] and recipe.validation == ["v"]
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(OAVMInputError, match="extends itself"):
        loop.load_recipe(tmp_path / "loop.toml")


def test_the_commands_pack_and_train_from_the_pack(tmp_path: Path, capsys):
    """`oavm pack-data` then `oavm train --data-pack` as a user types them, from a recipe file."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    _davis_like(root, np.random.default_rng(1))
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'''
name = "tiny"
[train]
seed = 2
log_every = 1
checkpoint_every = 0
sample_every = 0
cache_dir = "{cache}"
[model]
c = 32
key_dim = 16
num_queries = 4
num_heads = 2
window = 7
decoder_channels = [32, 24, 16, 16]
[loss]
laplacian_levels = 3
[datasets.real]
kind = "real"
sources = [ {{ name = "davis", root = "{root / 'davis'}", exclude = ["held"] }} ]
[[stages]]
name = "s"
datasets = {{ real = 1 }}
size = [{H}, {W}]
clip_length = 2
batch_size = 1
steps = 2
''')
    teacher = D.TeacherCache(cache, teacher_factory=_FakeTeacher)
    for seq in D.masked_videos(root / "davis", exclude=["held"]):
        teacher.load("davis", seq, (H, W))
    assert pack.main(["--config", str(recipe), "--out", str(tmp_path / "pack")]) == 0
    assert "--data-pack" in capsys.readouterr().out                    # it says how to train from it
    shutil.rmtree(root)
    shutil.rmtree(cache)
    assert loop.main(["--config", str(recipe), "--data-pack", str(tmp_path / "pack"), "--device", "cpu",
                      "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run/final.safetensors").is_file()
    assert loop.main(["--config", str(recipe), "--data-pack", str(tmp_path / "nothing"), "--device", "cpu",
                      "--out", str(tmp_path / "run2")]) == 2
    assert "not a data pack" in capsys.readouterr().err
