# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm eval`` on small real files (OpenImageIO), a tiny real checkpoint through the Engine API, RVM's real
ONNX model as baseline/teacher, and the composite evaluation set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import moving_disc_clip
from oavm_service.checkpoint import save_checkpoint
from oavm_service.errors import OAVMInputError
from oavm_service.io.images import write_image
from oavm_service.train import evaluate as E
from oavm_service.train import metrics as M
from oavm_service.train.data import read_grey, read_rgb, resize
from oavm_service.train.teacher import PseudoAlphaConfig, RVMTeacher, pseudo_alpha

TENNIS = Path("/work/shared/data/weak_masks/tennis")


def write_clip(folder: Path, frames: np.ndarray, truth: np.ndarray, kind: str) -> Path:
    """frames (T, H, W, 3) and truth (T, H, W) as 16-bit PNGs in <folder>/frames and <folder>/{alpha,masks}."""
    for t, (frame, gt) in enumerate(zip(frames, truth)):
        write_image(folder / "frames" / f"{t:05d}.png", frame, ["R", "G", "B"])
        write_image(folder / ("alpha" if kind == "alpha" else "masks") / f"{t:05d}.png", gt[..., None], ["Y"])
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """One soft-alpha clip (a moving disc) and one static clip with binary masks."""
    frames, alpha = moving_disc_clip(frames=3, height=48, width=64, seed=3)
    write_clip(tmp_path / "data" / "disc", frames, alpha, "alpha")
    still, still_alpha = moving_disc_clip(frames=1, height=48, width=64, seed=4)
    write_clip(tmp_path / "data" / "static", np.repeat(still, 3, 0),
               np.repeat((still_alpha > 0.5).astype(np.float32), 3, 0), "mask")
    return tmp_path / "data"


def run_eval(args: list[str], json_path: Path, capsys) -> tuple[dict, str]:
    assert E.main([*args, "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text()), capsys.readouterr().out


def test_copy_mask_on_a_static_clip_is_perfect(data_dir, tmp_path, capsys):
    results, table = run_eval(["--data", str(data_dir), "--baseline", "copy-mask"], tmp_path / "r.json", capsys)
    static = results["methods"]["copy-mask"]["clips"]["static"]
    assert static["truth"] == "mask" and static["frames"] == 3
    assert static["J"] == 1.0 and static["F"] == 1.0 and static["J&F"] == 1.0
    assert "== copy-mask" in table and "J&F" in table and "dtSSD" in table
    # on the moving disc, the copied first mask misses the motion: worse than nothing moving would be
    disc = results["methods"]["copy-mask"]["clips"]["disc"]
    assert disc["MAD"] > 0 and disc["dtSSD"] > 0 and "J" not in disc


def test_copy_mask_scores_equal_the_metrics_on_the_files(data_dir, tmp_path, capsys):
    results, _ = run_eval(["--data", str(data_dir), "--baseline", "copy-mask", "--clips", "disc"],
                          tmp_path / "r.json", capsys)
    clip = data_dir / "disc"
    truth = np.stack([read_grey(p) for p in sorted((clip / "alpha").iterdir())])
    prompt = (truth[0] > 0.5).astype(np.float32)
    expected = M.clip_alpha_metrics(np.repeat(prompt[None], 3, 0), truth)
    got = results["methods"]["copy-mask"]["clips"]["disc"]
    for name in M.ALPHA_METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-9)
    assert results["methods"]["copy-mask"]["mean"]["MAD"] == pytest.approx(expected["MAD"])


def test_checkpoint_and_rvm_frame_through_the_engine(data_dir, tmp_path, capsys, tiny_model):
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, meta={"name": "tiny-test"})
    results, table = run_eval(["--data", str(data_dir), "--checkpoint", str(checkpoint), "--device", "cpu",
                               "--baseline", "rvm-frame"], tmp_path / "r.json", capsys)
    assert list(results["methods"]) == ["tiny.safetensors", "rvm-frame"]
    for method in results["methods"].values():
        disc, static = method["clips"]["disc"], method["clips"]["static"]
        assert set(M.ALPHA_METRICS) <= set(disc) and set(M.MASK_METRICS) <= set(static)
        assert all(np.isfinite(disc[m]) for m in M.ALPHA_METRICS)
        assert 0.0 <= static["J"] <= 1.0 and 0.0 <= static["F"] <= 1.0
        assert set(M.ALPHA_METRICS) | set(M.MASK_METRICS) <= set(method["mean"])
    assert "== tiny.safetensors" in table and "== rvm-frame" in table
    # rvm-frame is RVMTeacher(recurrent=False), scored by the same metrics
    clip = data_dir / "disc"
    frames = np.stack([read_rgb(p) for p in sorted((clip / "frames").iterdir())])
    truth = np.stack([read_grey(p) for p in sorted((clip / "alpha").iterdir())])
    expected = M.clip_alpha_metrics(RVMTeacher(recurrent=False)(frames).alpha, truth)
    assert results["methods"]["rvm-frame"]["clips"]["disc"]["MAD"] == pytest.approx(expected["MAD"], rel=1e-6)


def test_bad_folders_say_what_to_do(tmp_path, data_dir, capsys):
    with pytest.raises(OAVMInputError, match="does not exist"):
        E.find_clips(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OAVMInputError, match="holds no clips"):
        E.find_clips(tmp_path / "empty")
    (data_dir / "disc" / "alpha" / "00002.png").unlink()
    with pytest.raises(OAVMInputError, match="3 frames but 2 ground-truth"):
        E.find_clips(data_dir)
    (tmp_path / "nogt" / "x" / "frames").mkdir(parents=True)
    with pytest.raises(OAVMInputError, match="no ground truth"):
        E.find_clips(tmp_path / "nogt")
    assert E.main(["--data", str(tmp_path / "nowhere"), "--baseline", "copy-mask"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert E.main(["--data", str(data_dir), "--downsample-ratio", "1.5"]) == 2
    assert "--downsample-ratio must be in (0, 1]" in capsys.readouterr().err


def test_downsample_ratio_reaches_the_engine(data_dir, tmp_path, tiny_model):
    """--downsample-ratio runs the checkpoint's network at that fraction of the clip's size."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, meta={"name": "tiny-test"})
    method = E.make_method("checkpoint", checkpoint=checkpoint, device="cpu", downsample_ratio=0.5)
    clip = data_dir / "disc"
    frame = read_rgb(sorted((clip / "frames").iterdir())[0])
    alpha = method.start(frame, (read_grey(sorted((clip / "alpha").iterdir())[0]) > 0.5).astype(np.float32))
    assert alpha.shape == frame.shape[:2]
    assert method.session.effective_downsample_ratio(*frame.shape[:2]) == 0.5


def test_composite_eval_set(tmp_path, capsys):
    out = tmp_path / "comp"
    dirs = E.make_composite_eval_set(out, indices=[3], num_frames=3, size=(40, 48), seed=1,
                                     background_frames=range(150, 153))
    assert dirs == [out / "comp1k_3"] and (out / "NOTICE.txt").read_text().count("non-commercial") == 1
    clip, = E.find_clips(out)
    assert clip.truth_kind == "alpha" and len(clip.frames) == 3
    alpha = np.stack([read_grey(p) for p in clip.truth])
    frames = np.stack([read_rgb(p) for p in clip.frames])
    assert alpha.shape == (3, 40, 48) and frames.shape == (3, 40, 48, 3)
    assert ((alpha > 0.05) & (alpha < 0.95)).any()                # real soft edges (hair)
    assert not np.array_equal(alpha[0], alpha[2])                 # the foreground drifts
    # Eq. 1: the same clip over other background frames has the same alpha, the same pixels where alpha = 1
    # and other pixels where alpha = 0
    other = E.make_composite_eval_set(tmp_path / "other", indices=[3], num_frames=3, size=(40, 48), seed=1,
                                      background_frames=range(190, 193))[0]
    alpha_b = np.stack([read_grey(p) for p in sorted((other / "alpha").iterdir())])
    frames_b = np.stack([read_rgb(p) for p in sorted((other / "frames").iterdir())])
    assert np.array_equal(alpha, alpha_b)
    solid, clear = alpha == 1.0, alpha == 0.0
    assert solid.any() and np.abs(frames[solid] - frames_b[solid]).max() < 1e-3   # 16-bit rounding
    assert clear.any() and np.abs(frames[clear] - frames_b[clear]).max() > 0.1


@pytest.fixture(scope="module")
def tennis() -> tuple[np.ndarray, np.ndarray]:
    """Four real frames (a person) at 128x224 with their masks."""
    frames = sorted((TENNIS / "frames").iterdir())[:4]
    masks = sorted((TENNIS / "masks").iterdir())[:4]
    return (np.clip(np.stack([resize(read_rgb(p), (128, 224)) for p in frames]), 0, 1),
            np.stack([resize(read_grey(p), (128, 224)) > 0.5 for p in masks]))


def test_rvm_teacher_recurrent_and_frame_by_frame(tennis):
    frames, masks = tennis
    recurrent = RVMTeacher()(frames)
    single = RVMTeacher(recurrent=False)(frames)
    assert recurrent.alpha.shape == (4, 128, 224) and recurrent.foreground.shape == (4, 128, 224, 3)
    # the first frame starts from the zero state either way; later frames differ only by the carried state
    assert np.array_equal(recurrent.alpha[0], single.alpha[0])
    assert not np.array_equal(recurrent.alpha[3], single.alpha[3])
    # frame by frame means frame 3 alone gives the same as frame 3 in the clip
    assert np.allclose(RVMTeacher(recurrent=False)(frames[3:]).alpha[0], single.alpha[3], atol=1e-6)
    # and RVM does find the person
    assert M.jaccard(recurrent.alpha[3], masks[3]) > 0.6


def test_pseudo_alpha_rule():
    yy, xx = np.mgrid[0:64, 0:96]
    disc = np.clip(12.5 - np.hypot(yy - 32, xx - 30), 0, 1)       # the object, a soft 1-px edge
    other = np.clip(8.5 - np.hypot(yy - 32, xx - 78), 0, 1)       # another "person" RVM also mattes
    rvm = np.maximum(disc, other).astype(np.float32)
    rvm[32, 30] = 0.3                                              # a hole RVM sees inside the object
    rvm[30, 26] = 0.95                                             # RVM not quite sure: snapped to 1
    mask = disc > 0.5
    config = PseudoAlphaConfig(band=3)
    out = pseudo_alpha(rvm, mask, config)
    assert out[32, 78] == 0.0                                      # other object: gone
    assert out[32, 30] == pytest.approx(0.3) and out[30, 26] == 1.0
    edge = (disc > 0) & (disc < 1)
    assert np.allclose(out[edge], rvm[edge])                       # soft edge: RVM's
    # RVM sees nothing of the object (e.g. a car): the mask itself
    assert np.array_equal(pseudo_alpha(np.zeros_like(rvm), mask, config), mask.astype(np.float32))
    with pytest.raises(OAVMInputError):
        pseudo_alpha(rvm, mask[:10])
