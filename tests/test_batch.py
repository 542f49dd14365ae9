# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm batch`` and ``oavm demo`` end to end: real EXR/PNG/movie files, a tiny random checkpoint, real processes.

The reference for every output is a ClipSession in this process, loaded from the same checkpoint (fp32, CPU) and
fed the frames the way the paper's streaming inference runs: forward from the first keyframe with re-prompts at
later keyframes, backward from it for earlier frames. Frames are 64x48 so the module stays fast on a shared CPU.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import OpenImageIO as oiio
import pytest

from oavm_service import __version__, batch, demo
from oavm_service.io.colour import linear_to_srgb
from oavm_service.io.images import Window, read_image, verify_image, write_image
from oavm_service.io.movies import MovieReader, write_movie
from tests.helpers.live_service import free_port, live_service

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64
FRAMES = list(range(1001, 1007))
DATA = Window(8, 4, W, H)                 # the plates' data window inside a larger display window
DISPLAY = Window(0, 0, 80, 56)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the processes this module starts: on a shared, oversubscribed CPU, OpenMP
    threads spin-waiting on each other make a tiny model ~10x slower than a single thread."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env



def disc_clip(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Scene-linear frames of a disc moving over a blocky background, and the disc's masks."""
    rng = np.random.default_rng(seed)
    background = rng.random((H // 8, W // 8, 3)).astype(np.float32).repeat(8, 0).repeat(8, 1)
    yy, xx = np.mgrid[0:H, 0:W]
    frames, masks = [], []
    for t in range(n):
        disc = (((yy - 24) ** 2 + (xx - 20 - 2 * t) ** 2) < 100).astype(np.float32)
        frame = background * (1 - disc[..., None]) + np.array([0.9, 0.5, 0.1], np.float32) * disc[..., None]
        frames.append((frame ** 2.2).astype(np.float32))      # linear light, as an EXR plate holds it
        masks.append(disc)
    return frames, masks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint, written here (tests/helpers' make_tiny_checkpoint does the same in a subprocess)."""
    import torch

    from oavm_service.checkpoint import save_checkpoint
    from oavm_service.model import OAVM, OAVMConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, OAVM(OAVMConfig.tiny()).eval(), meta={"name": "tiny-test"}, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    from oavm_service.engine import Engine

    return Engine.from_checkpoint(str(checkpoint), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def shot(tmp_path_factory) -> Path:
    """plate.1001-1008.exr (data window inside the display window) and full-frame masks at every frame."""
    root = tmp_path_factory.mktemp("shot")
    frames, masks = disc_clip(len(FRAMES))
    for f, frame, mask in zip(FRAMES, frames, masks):
        write_image(root / f"plate.{f}.exr", frame, list("RGB"), data_window=DATA, display_window=DISPLAY)
        full = np.zeros((DISPLAY.height, DISPLAY.width), np.float32)
        full[DATA.y:DATA.y + H, DATA.x:DATA.x + W] = mask
        write_image(root / f"mask.{f}.png", full, ["Y"])
    return root


def run_batch(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = batch.main([str(a) for a in args], stream=out)
    return code, out.getvalue()


def plates(shot: Path, frames: list[int]) -> dict[int, np.ndarray]:
    """What the network must see: the sRGB-encoded linear plate."""
    return {f: np.clip(linear_to_srgb(read_image(shot / f"plate.{f}.exr").rgb()), 0, 1) for f in frames}


def mask_at(shot: Path, f: int) -> np.ndarray:
    return read_image(shot / f"mask.{f}.png").pixels[DATA.y:DATA.y + H, DATA.x:DATA.x + W, 0]


def reference(engine, frames: dict[int, np.ndarray], order: list[int], prompts: dict[int, dict[str, np.ndarray]]):
    """Alpha/fgmask per frame from one ClipSession stepped through ``order``."""
    session = engine.new_session()
    out = {}
    for f in order:
        mattes = session.step(frames[f], prompts.get(f))
        out[f] = {o: (m.alpha, m.fgmask) for o, m in mattes.items()}
    return out


def exr_layers(path: Path) -> dict[str, np.ndarray]:
    image = read_image(path)
    return {c: image.pixels[..., i] for i, c in enumerate(image.channels)}


def assert_matches(path: Path, expected: dict[str, tuple[np.ndarray, np.ndarray]], objects: list[str]) -> None:
    layers = exr_layers(path)
    assert sorted(layers) == sorted(f"{o}.{c}" for o in objects for c in ("A", "fgmask"))
    for o in objects:
        alpha, fgmask = expected.get(o, (np.zeros((H, W)), np.zeros((H, W))))
        np.testing.assert_allclose(layers[f"{o}.A"], alpha, atol=1e-3, err_msg=f"{path} {o}.A")
        np.testing.assert_allclose(layers[f"{o}.fgmask"], fgmask, atol=1e-3, err_msg=f"{path} {o}.fgmask")


def same_pixels(a: Path, b: Path) -> bool:
    return np.array_equal(read_image(a).pixels, read_image(b).pixels)


# ------------------------------------------------------------------------------------------------ planning


def _plan(frames: str, *keys: int) -> list[tuple[str, list[tuple[int, bool, bool]]]]:
    """(pass, [(frame, written, prompted)]) for a frame range and keyframes."""
    masks = {k: {"matte": batch.KeyMask("matte", "m.png", k)} for k in keys}
    from oavm_service.io.sequences import parse_frame_range
    return [(p.name, [(s.frame, s.write, bool(s.prompts)) for s in p.steps])
            for p in batch.plan_passes(sorted(parse_frame_range(frames)), masks)]


def test_plan_forward_backward_lead_in_and_keyframes():
    assert _plan("1-4", 2) == [("forward", [(2, True, True), (3, True, False), (4, True, False)]),
                               ("backward", [(2, False, True), (1, True, False)])]
    # a chunk after the keyframe: lead-in at the chunk's own step; a later keyframe is always stepped
    assert _plan("11-15x2", 1, 6) == [("forward", [(1, False, True), (3, False, False), (5, False, False),
                                                   (6, False, True), (7, False, False), (9, False, False),
                                                   (11, True, False), (13, True, False), (15, True, False)])]
    assert _plan("1,5,10-11", 5) == [("forward", [(5, True, True), (10, True, False), (11, True, False)]),
                                     ("backward", [(5, False, True), (4, False, False), (3, False, False),
                                                   (2, False, False), (1, True, False)])]
    assert _plan("1-2", 5)[0][1][-1] == (1, True, False) and _plan("1-2", 5)[0][0] == "backward"


def test_mask_and_object_arguments():
    assert batch.parse_key("1001=shot/m.png", "matte") == batch.KeyMask("matte", "shot/m.png", 1001, None)
    assert batch.parse_key("ids.png:3", "matte") == batch.KeyMask("matte", "ids.png", None, 3)
    assert batch.parse_key("-5=C:/m.png:2", "x") == batch.KeyMask("x", "C:/m.png", -5, 2)
    assert batch.parse_object("hero=1050=h.png") == batch.KeyMask("hero", "h.png", 1050, None)
    with pytest.raises(batch.OAVMInputError, match="NAME="):
        batch.parse_object("hero.A=h.png")


def test_progress_lines_for_farms_and_a_bar_on_terminals():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    farm, tty = io.StringIO(), Terminal()
    for stream in (farm, tty):
        progress = batch.Progress(4, stream)
        for f in range(3):
            progress.advance(f"frame {f}: wrote x")
        progress.close()
    assert farm.getvalue().splitlines() == ["frame 0: wrote x", "Progress: 25%", "frame 1: wrote x", "Progress: 50%",
                                            "frame 2: wrote x", "Progress: 75%"]
    assert "Progress:" not in tty.getvalue() and "[######################........]  75% 3/4" in tty.getvalue()


# ------------------------------------------------------------------------------------------------ tests


def test_exr_in_exr_out_keeps_windows_metadata_and_matches_the_engine(shot, checkpoint, engine, tmp_path):
    code, log = run_batch("--input", shot / "plate.####.exr", "--mask", shot / "mask.1001.png",
                          "--frames", "1001-1003", "--output", tmp_path / "matte.####.exr",
                          "--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32")
    assert code == 0, log
    for f in range(1001, 1004):
        assert f"frame {f}: wrote" in log
    assert "Progress: 100%" in log and "Progress: 33%" in log

    spec = oiio.ImageInput.open(str(tmp_path / "matte.1002.exr")).spec()
    assert set(spec.channelnames) == {"matte.A", "matte.fgmask"}
    assert (spec.x, spec.y, spec.width, spec.height) == (DATA.x, DATA.y, W, H)
    assert (spec.full_x, spec.full_y, spec.full_width, spec.full_height) == (0, 0, DISPLAY.width, DISPLAY.height)
    assert str(spec.format) == "half" and spec.get_string_attribute("compression") == "zip"
    assert spec.getattribute("oavm:version") == __version__
    assert spec.getattribute("oavm:checkpoint_sha256") == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert spec.getattribute("oavm:source_frame") == str(shot / "plate.1002.exr")
    assert spec.getattribute("oavm:source_frame_number") == 1002

    frames = plates(shot, FRAMES)
    expected = reference(engine, frames, [1001, 1002, 1003], {1001: {"matte": mask_at(shot, 1001)}})
    for f in range(1001, 1004):
        assert_matches(tmp_path / f"matte.{f}.exr", expected[f], ["matte"])


def test_keyframes_reprompt_forward_and_run_backward(shot, checkpoint, engine, tmp_path):
    code, log = run_batch("-i", shot / "plate.%04d.exr", "--mask", f"1002={shot / 'mask.1002.png'}",
                          "--mask", f"1004={shot / 'mask.####.png'}", "-f", "1001-1005",
                          "-o", tmp_path / "m.####.exr", "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, log
    frames = plates(shot, FRAMES)
    fwd = reference(engine, frames, [1002, 1003, 1004, 1005],
                    {1002: {"matte": mask_at(shot, 1002)}, 1004: {"matte": mask_at(shot, 1004)}})
    bwd = reference(engine, frames, [1002, 1001], {1002: {"matte": mask_at(shot, 1002)}})
    for f in range(1001, 1006):
        assert_matches(tmp_path / f"m.{f}.exr", (bwd if f < 1002 else fwd)[f], ["matte"])
    assert read_image(tmp_path / "m.1001.exr").attributes["oavm:direction"] == "backward"
    states = sorted(p.name for p in (tmp_path / "m.oavm-state").iterdir())
    assert states == ["backward.1001.json", "backward.1001.state", "forward.1005.json", "forward.1005.state"]


def test_several_objects_get_their_own_layers(shot, checkpoint, engine, tmp_path):
    code, log = run_batch("-i", shot / "plate.####.exr", "--object", f"hero=1001={shot / 'mask.1001.png'}",
                          "--object", f"dog=1002={shot / 'mask.1002.png'}", "-f", "1001-1003",
                          "-o", tmp_path / "m.####.exr", "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, log
    frames = plates(shot, FRAMES)
    expected = reference(engine, frames, [1001, 1002, 1003],
                         {1001: {"hero": mask_at(shot, 1001)}, 1002: {"dog": mask_at(shot, 1002)}})
    for f in range(1001, 1004):
        assert_matches(tmp_path / f"m.{f}.exr", expected[f], ["hero", "dog"])     # dog is 0 before 1002
    assert not exr_layers(tmp_path / "m.1001.exr")["dog.A"].any()


def test_movie_in_png_out_with_lead_in(checkpoint, engine, tmp_path):
    frames, masks = disc_clip(4)
    movie = tmp_path / "plate.mp4"
    write_movie(movie, [np.rint(np.clip(linear_to_srgb(f), 0, 1) * 255).astype(np.uint8) for f in frames])
    write_image(tmp_path / "key.png", masks[0], ["Y"])
    code, log = run_batch("-i", movie, "--first-frame", "1001", "--mask", f"1001={tmp_path / 'key.png'}",
                          "-f", "1003-1004", "-o", tmp_path / "out" / "alpha.####.png",
                          "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, log
    assert "frame 1002: lead-in" in log and not (tmp_path / "out" / "alpha.1002.png").exists()
    with MovieReader(movie, first_frame=1001) as reader:
        decoded = {f: reader.read(f) for f in range(1001, 1005)}
    expected = reference(engine, decoded, list(range(1001, 1005)), {1001: {"matte": masks[0]}})
    for f in (1003, 1004):
        path = tmp_path / "out" / f"alpha.{f}.png"
        spec = oiio.ImageInput.open(str(path)).spec()
        assert str(spec.format) == "uint16" and spec.nchannels == 1
        assert spec.getattribute("oavm:source_frame") == f"{movie}@{f}"
        np.testing.assert_allclose(read_image(path).pixels[..., 0], expected[f]["matte"][0], atol=1 / 65535 + 1e-6)


def test_rgba_output_premultiplies_the_plate(shot, checkpoint, tmp_path):
    code, log = run_batch("-i", shot / "plate.####.exr", "--mask", shot / "mask.1001.png", "-f", "1001-1002",
                          "--output-mode", "rgba", "--premultiply", "-o", tmp_path / "rgba.####.exr",
                          "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, log
    out = read_image(tmp_path / "rgba.1002.exr")
    assert set(out.channels) == set("RGBA") and out.data_window == DATA
    plate = read_image(shot / "plate.1002.exr").rgb()
    alpha = out.channel("A")
    np.testing.assert_allclose(out.rgb(), plate * alpha[..., None], atol=2e-3)


def test_chunks_continue_the_memory_and_match_one_run(shot, checkpoint, tmp_path):
    common = ["-i", shot / "plate.####.exr", "--mask", f"1001={shot / 'mask.1001.png'}", "--checkpoint",
              checkpoint, "--device", "cpu", "--state-every", "2"]
    assert run_batch(*common, "-o", tmp_path / "one" / "m.####.exr", "-f", "1001-1004")[0] == 0
    logs = [run_batch(*common, "-o", tmp_path / "chunked" / "m.####.exr", "-f", chunk)[1]
            for chunk in ("1001-1002", "1003-1004")]
    assert "resuming after frame 1002" in logs[1]
    code, log = run_batch(*common, "-o", tmp_path / "late" / "m.####.exr", "-f", "1003-1004")  # no state: lead-in
    assert code == 0 and "frame 1002: lead-in" in log
    for f in range(1001, 1005):
        assert same_pixels(tmp_path / "one" / f"m.{f}.exr", tmp_path / "chunked" / f"m.{f}.exr"), f
    for f in (1003, 1004):
        assert same_pixels(tmp_path / "one" / f"m.{f}.exr", tmp_path / "late" / f"m.{f}.exr"), f
    code, log = run_batch(*common, "-o", tmp_path / "one" / "m.####.exr", "-f", "1001-1004")
    assert code == 0 and log.count("is complete, skipped") == 4 and "wrote" not in log

    (tmp_path / "chunked" / "m.1004.exr").unlink()              # a lost frame, and a damaged state before it
    (tmp_path / "chunked" / "m.oavm-state" / "forward.1002.state").write_bytes(b"damaged")
    code, log = run_batch(*common, "-o", tmp_path / "chunked" / "m.####.exr", "-f", "1003-1004")
    assert code == 0 and "cannot use the state" in log and "from keyframe 1001" in log
    assert same_pixels(tmp_path / "one" / "m.1004.exr", tmp_path / "chunked" / "m.1004.exr")


def test_resume_after_kill_matches_an_uninterrupted_run(checkpoint, tmp_path):
    n = 16
    frames, masks = disc_clip(n, seed=1)
    for i, frame in enumerate(frames):
        write_image(tmp_path / "shot" / f"p.{i + 1:04d}.exr", frame, list("RGB"))
    write_image(tmp_path / "shot" / "key.png", masks[0], ["Y"])
    args = ["-i", tmp_path / "shot" / "p.####.exr", "--mask", f"1={tmp_path / 'shot' / 'key.png'}",
            "--checkpoint", checkpoint, "--device", "cpu", "--state-every", "2"]
    assert run_batch(*args, "-o", tmp_path / "ref" / "m.####.exr")[0] == 0

    cmd = [sys.executable, "-m", "oavm_service", "batch", *map(str, args), "-o", str(tmp_path / "out" / "m.####.exr")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("frame 3: wrote"):
            proc.send_signal(signal.SIGKILL)                   # a node dying mid-shot, no cleanup at all
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    written = sorted((tmp_path / "out").glob("m.*.exr"))
    assert 3 <= len(written) < n
    for path in written:                                       # nothing half-written under a final name
        assert verify_image(path, channels=["matte.A", "matte.fgmask"], data_window=Window(0, 0, W, H)) is None
    # what a kill mid-write leaves (the SIGKILL above may have left one as well; pid 2**22 + 1 is never alive),
    # and another job's, which must stay
    (tmp_path / "out" / f".m.{n - 1:04d}.exr.oavm-tmp-{2 ** 22 + 1}").write_bytes(b"half a frame")
    (tmp_path / "out" / ".other.0001.exr.oavm-tmp-1").write_bytes(b"not ours")

    # requeued, then cancelled by the farm (SIGTERM): exit 130, no temporary file left behind
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("frame 6: wrote"):
            proc.send_signal(signal.SIGTERM)
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=60)
    proc.stdout.close()
    log = "".join(seen)
    assert proc.returncode == batch.EXIT_INTERRUPTED, log
    assert "forward: resuming after frame" in log and "interrupted" in log and "half-written file(s)" in log
    assert [p.name for p in (tmp_path / "out").glob(".*oavm-tmp*")] == [".other.0001.exr.oavm-tmp-1"]
    assert len(list((tmp_path / "out").glob("m.*.exr"))) < n

    code, log = run_batch(*args, "-o", tmp_path / "out" / "m.####.exr")     # requeued again: finishes
    assert code == 0, log
    assert "forward: resuming after frame" in log and "forward: from keyframe" not in log
    for i in range(1, n + 1):
        assert same_pixels(tmp_path / "ref" / f"m.{i:04d}.exr", tmp_path / "out" / f"m.{i:04d}.exr"), i


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_frame_exits_1_naming_it_and_keeps_earlier_frames(shot, checkpoint, tmp_path, capsys, damage):
    plate_dir = tmp_path / "plates"
    plate_dir.mkdir()
    for f in range(1001, 1005):
        (plate_dir / f"plate.{f}.exr").write_bytes((shot / f"plate.{f}.exr").read_bytes())
    good = (plate_dir / "plate.1003.exr").read_bytes()
    (plate_dir / "plate.1003.exr").write_bytes(good[: len(good) // 2] if damage == "truncated" else b"\0" * 999)
    args = ["-i", plate_dir / "plate.####.exr", "--mask", f"1001={shot / 'mask.1001.png'}",
            "--checkpoint", checkpoint, "--device", "cpu", "--state-every", "10", "-o", tmp_path / "m.####.exr"]
    code, log = run_batch(*args)
    err = capsys.readouterr().err
    assert code == batch.EXIT_BAD_INPUT
    assert "plate.1003.exr" in err and ("corrupt" in err or "cannot read" in err)
    for f in (1001, 1002):
        assert verify_image(tmp_path / f"m.{f}.exr", channels=["matte.A", "matte.fgmask"], data_window=DATA) is None
    assert not list(tmp_path.glob("m.100[34].exr")) and not list(tmp_path.glob(".m.*"))

    (plate_dir / "plate.1003.exr").write_bytes(good)           # the artist re-renders the frame
    code, log = run_batch(*args)
    assert code == 0 and "resuming after frame 1002" in log     # from the state saved before the bad frame
    assert "frame 1001" not in log.split("resuming")[1] and "frame 1004: wrote" in log


def test_connect_gives_the_same_files_as_in_process(shot, checkpoint, tmp_path):
    # frame 1004 keys two objects at once (the hero again, a new dog): one `prompt` request through the service
    common = ["-i", shot / "plate.####.exr", "--object", f"hero=1002={shot / 'mask.1002.png'}",
              "--object", f"hero=1004={shot / 'mask.1004.png'}", "--object", f"dog=1004={shot / 'mask.1003.png'}",
              "-f", "1001-1004", "--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32"]
    assert run_batch(*common, "-o", tmp_path / "local" / "m.####.exr")[0] == 0
    with live_service(tmp_path / "svc", checkpoint=checkpoint) as endpoint:
        code, log = run_batch(*common, "-o", tmp_path / "remote" / "m.####.exr", "--connect", endpoint,
                              "--state-every", "2")
        assert code == 0, log
        assert "(service" in log
        (tmp_path / "remote" / "m.1004.exr").unlink()           # resume through the service's save/load_clip
        code, log = run_batch(*common, "-o", tmp_path / "remote" / "m.####.exr", "--connect", endpoint,
                              "--state-every", "2")
        assert code == 0 and "forward: resuming after frame 1003" in log, log
    for f in range(1001, 1005):
        assert same_pixels(tmp_path / "local" / f"m.{f}.exr", tmp_path / "remote" / f"m.{f}.exr"), f
    keyed = read_image(tmp_path / "remote" / "m.1004.exr")
    assert keyed.channel("dog.A").max() > 0.5 and keyed.channel("hero.A").max() > 0.5

    with live_service(tmp_path / "svc-old", checkpoint=checkpoint) as endpoint:   # a service without 'prompt'
        def older():
            stepper = batch.ServiceStepper(endpoint, None, None, 60.0)
            stepper.keys_together = False            # what a status without "prompt" in its ops gives
            return stepper
        config = batch.parse_args([str(a) for a in common] + ["-o", str(tmp_path / "old" / "m.####.exr"),
                                                              "--connect", endpoint])
        with pytest.raises(batch.OAVMInputError, match=r"frame\(s\) 1004 key several objects .* update the service"):
            batch.BatchJob(config, stepper_factory=older, stream=io.StringIO()).run()
    assert not (tmp_path / "old").exists()              # refused before any frame
    import torch                   # the service sent half floats (EXR stores half anyway): same files, half the bytes
    states = sorted((tmp_path / "remote").rglob("*.state"))
    assert states and all(torch.load(p, weights_only=True)["reply_dtype"] == "float16" for p in states)


def test_errors_have_documented_exit_codes(shot, checkpoint, tmp_path, capsys):
    base = ["-i", shot / "plate.####.exr", "-o", tmp_path / "m.####.exr", "--checkpoint", checkpoint,
            "--device", "cpu"]
    cases = [
        ([*base, "--mask", tmp_path / "nope.png"], batch.EXIT_BAD_INPUT, "nope.png"),
        ([*base, "--mask", shot / "mask.1001.png", "-f", "1001-1020"], batch.EXIT_BAD_INPUT, "1007-1020"),
        ([*base, "--mask", shot / "mask.1001.png", "-f", "1001-x"], batch.EXIT_BAD_INPUT, "frame range"),
        ([*base, "--mask", shot / "mask.1001.png", "-f", "1003-1004"], batch.EXIT_BAD_INPUT, "FRAME="),
        ([*base, "--mask", shot / "mask.1001.png", "--bogus"], batch.EXIT_BAD_INPUT, "--bogus"),
        ([*base, "--object", "1001=x.png"], batch.EXIT_BAD_INPUT, "NAME="),
        (["-i", shot / "plate.####.exr", "-o", tmp_path / "m.####.exr", "--mask", shot / "mask.1001.png",
          "--checkpoint", tmp_path / "missing.safetensors"], batch.EXIT_MODEL, "missing.safetensors"),
        ([*base[:4], "--mask", shot / "mask.1001.png", "--connect", f"tcp://127.0.0.1:{free_port()}",
          "--timeout", "0.3"], batch.EXIT_UNAVAILABLE, "no OAVM service"),
    ]
    for argv, expected, needle in cases:
        code, _ = run_batch(*argv)
        err = capsys.readouterr().err
        assert code == expected, (argv, err)
        assert needle in err, (needle, err)
    assert not list(tmp_path.glob("m.*.exr"))


def test_demo_writes_mattes_contact_sheet_and_movie(checkpoint, tmp_path, capsys):
    code = demo.main(["--checkpoint", str(checkpoint), "--frames", "2", "--output-dir", str(tmp_path),
                      "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    mattes = sorted((tmp_path / "mattes").glob("judo.*.exr"))
    assert [p.name for p in mattes] == ["judo.00000.exr", "judo.00001.exr"]
    assert set(read_image(mattes[0]).channels) == {"matte.A", "matte.fgmask"}
    sheet = read_image(tmp_path / "judo_contact_sheet.png")
    assert sheet.pixels.shape[2] == 3 and sheet.pixels.shape[1] > 3 * demo.SHEET_CELL_WIDTH
    with av.open(str(tmp_path / "judo_composite.mp4")) as movie:
        decoded = [f.to_ndarray(format="rgb24") for f in movie.decode(video=0)]
    assert len(decoded) == 2 and decoded[0].shape == (480, 854, 3)
    assert "contact sheet" in out and str(tmp_path / "judo_composite.mp4") in out


def test_read_ahead_reads_the_next_frame_on_a_worker_and_raises_at_the_bad_frame():
    """The farm batch reads frame k+1 while frame k is in the network: frames arrive in order, reads happen on
    the worker (one ahead, never more), and a frame that cannot be read raises when it is asked for."""
    import threading
    import time

    from oavm_service.batch import ReadAhead
    from oavm_service.errors import OAVMInputError

    log: list[tuple[int, str]] = []
    release = threading.Event()

    def read(frame: int):
        log.append((frame, threading.current_thread().name))
        if frame == 12:
            release.wait(5)
            raise OAVMInputError("frame 12 is corrupt")
        return f"plate {frame}"

    with ReadAhead(read, [10, 11, 12, 13]) as plates:
        assert plates.next() == "plate 10"
        assert plates.next() == "plate 11"          # asking for 11 set 12 going; 13 waits for 12 to be asked for
        deadline = time.monotonic() + 5
        while len(log) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)                            # (nothing else may start meanwhile)
        assert [f for f, _ in log] == [10, 11, 12]
        assert all(name.startswith("oavm-read-ahead") for _, name in log)
        release.set()
        with pytest.raises(OAVMInputError, match="frame 12 is corrupt"):
            plates.next()
        assert plates.next() == "plate 13"
        with pytest.raises(IndexError):
            plates.next()


def test_write_behind_writes_in_order_on_a_worker_keeps_at_most_depth_and_raises_at_the_bad_write():
    """The batch writes frame k's file while frame k+1 is in the network: writes run in order on one worker, their
    follow-ups (progress lines) on the caller's thread in the same order, at most ``depth`` wait, and a failed write
    raises where it is finished; after an error elsewhere, the writes already submitted still complete."""
    import threading

    from shared.write_behind import WriteBehind

    caller = threading.current_thread().name
    gate, written, followed = threading.Event(), [], []

    def write(frame: int) -> str:
        if frame == 1:
            gate.wait(5)                             # the first write is slow: the caller goes on meanwhile
        if frame == 4:
            raise OSError("disk full at frame 4")
        written.append((frame, threading.current_thread().name))
        return f"file {frame}"

    def then(result: str) -> None:
        followed.append((result, threading.current_thread().name))

    with WriteBehind(depth=2) as writes:
        writes.submit(write, 1, then=then)
        writes.submit(write, 2, then=then)           # two waiting: the caller was not held up
        assert written == [] and followed == []
        gate.set()
        writes.submit(write, 3, then=then)           # a third first finishes the oldest
        assert followed == [("file 1", caller)]
        writes.submit(write, 4, then=then)
        with pytest.raises(OSError, match="disk full at frame 4"):
            writes.flush()
    assert [f for f, _ in written] == [1, 2, 3]
    assert all(name.startswith("oavm-write-behind") for _, name in written)
    assert followed == [("file 1", caller), ("file 2", caller), ("file 3", caller)]

    written.clear()
    with pytest.raises(RuntimeError, match="the network failed"):
        with WriteBehind(depth=2) as writes:
            writes.submit(write, 5)
            writes.submit(write, 4)                  # its own error does not hide the network's
            raise RuntimeError("the network failed")
    assert [f for f, _ in written] == [5]            # computed before the error: still written

    written.clear()
    with WriteBehind(depth=0) as writes:             # no core to spare: written at once, on the caller's thread
        writes.submit(write, 6, then=then)
        assert written == [(6, caller)] and followed[-1] == ("file 6", caller)


def test_writing_behind_gives_the_same_files_and_log_as_writing_at_once(shot, engine, tmp_path):
    import threading

    runs = {}
    for spare in (True, False):
        config = batch.BatchConfig(input=str(shot / "plate.####.exr"), output=str(tmp_path / f"{spare}" / "m.####.exr"),
                                   masks=[batch.KeyMask("matte", str(shot / "mask.1001.png"), 1001)],
                                   frames=[1001, 1002, 1003, 1004], state_every=2)

        def stepper(spare=spare):
            s = batch.EngineStepper(engine, None)
            s.spare_cpu = spare                      # what the machine's cores would decide
            return s

        out, threads = io.StringIO(), set()
        job = batch.BatchJob(config, stepper_factory=stepper, stream=out)
        write = job.write_frame

        def recorded(*args, write=write, threads=threads):
            threads.add(threading.current_thread().name.split("_")[0])
            return write(*args)

        job.write_frame = recorded
        assert job.run() == 0
        runs[spare] = [re.sub(r"\(\d+\.\d+ s\)|True|False", "", line) for line in out.getvalue().splitlines()]
        assert threads == ({"oavm-write-behind"} if spare else {threading.current_thread().name})
    assert runs[True] == runs[False]
    assert [line.split(":")[0] for line in runs[True] if line.startswith("frame ")] == \
        [f"frame {f}" for f in (1001, 1002, 1003, 1004)]
    for f in range(1001, 1005):
        assert same_pixels(tmp_path / "True" / f"m.{f}.exr", tmp_path / "False" / f"m.{f}.exr")
    states = sorted(p.name for p in (tmp_path / "True" / "m.oavm-state").iterdir())
    assert states == sorted(p.name for p in (tmp_path / "False" / "m.oavm-state").iterdir()) and states
