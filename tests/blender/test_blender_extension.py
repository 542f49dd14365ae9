# SPDX-License-Identifier: GPL-3.0-or-later
"""The built extension in real Blender (bpy, background mode) against a real OAVM service on loopback.

Each test runs one scenario of bpy_scenarios.py in a fresh process with a fresh user folder
(``BLENDER_USER_RESOURCES``), where the zip from tools/dist_blender.py is installed like "Install from Disk".
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from plugin_blender.core.imageio import read_matte_exr
from tests.blender.synthetic_clip import FRAMES, HEIGHT, RECT, RECT_FRAME4, WIDTH, direct_mattes, rect_mask
from tests.helpers.live_service import free_port

HERE = Path(__file__).resolve().parent
HALF_TOLERANCE = 1e-3
def run_scenario(name: str, work: Path, **args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    args = {"work": str(work), "width": WIDTH, "height": HEIGHT, "frames": FRAMES, "rect": RECT,
            "rect_frame4": RECT_FRAME4, **args}
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(work / "blender-user"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(HERE / "bpy_scenarios.py"), name, json.dumps(args, default=str)],
                          env=env, capture_output=True, text=True, timeout=400, cwd=work)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OAVM-RESULT ")]
    assert proc.returncode == 0 and lines, f"bpy exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len("OAVM-RESULT "):])
    assert "crashed" not in result, result["crashed"] + "\n" + proc.stdout[-3000:]
    result["log"] = proc.stdout
    return result


def assert_installed(install: dict) -> None:
    assert install["outcome"] == ["FINISHED"] and install["enabled"], install
    # the bundled wheels of this platform and Python were installed by Blender, and the add-on runs on them
    assert {"zmq", "msgpack"} <= set(install["installed"]), install
    assert install["modules"]["zmq"].startswith(install["site_packages"]), install
    assert install["modules"]["msgpack"].startswith(install["site_packages"]), install
    # ... and on the OpenImageIO that Blender bundles (the PyPI bpy 4.2 module lacks Blender's bundled Python
    # packages, there the venv's openimageio stands in; bpy 4.5 and 5.0 have them like Blender itself)
    if install["bundled_has_oiio"] or not install["blender"].startswith("4.2"):
        assert install["modules"]["OpenImageIO"].startswith(install["bundled"]), install


def test_zip_is_a_valid_extension_with_wheels_and_vendored_client(extension_zip):
    with zipfile.ZipFile(extension_zip) as archive:
        names = set(archive.namelist())
        manifest = archive.read("blender_manifest.toml").decode()
    assert {"__init__.py", "blender_manifest.toml", "core/job.py", "shared/client.py", "shared/protocol.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    for needle in ('type = "add-on"', 'blender_version_min = "4.2.0"', '"SPDX:GPL-3.0-or-later"',
                   'network = "talks to the local OAVM service"', 'files = "reads frames and writes mattes"'):
        assert needle in manifest
    wheels = sorted(n for n in names if n.startswith("wheels/"))
    for tag in ("cp311-cp311-manylinux", "cp311-cp311-win_amd64", "cp311-cp311-macosx", "-win_arm64",
                "aarch64"):
        assert any(tag in w for w in wheels if "pyzmq" in w), tag
        assert any(tag in w for w in wheels if "msgpack" in w), tag
    assert any("cp313" in w or "abi3" in w for w in wheels)             # Blender 5.1's Python 3.13
    assert all(f'"./{w}"' in manifest for w in wheels)
    # Blender's own manifest validator (the code behind `blender --command extension validate`)
    bpy_dir = Path(importlib.util.find_spec("bpy").origin).parent        # located, not imported
    validator = next(bpy_dir.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    done = subprocess.run([sys.executable, str(validator), "validate", str(extension_zip)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "Success" in done.stdout, done.stdout + done.stderr


def test_command_line_install(extension_zip, tmp_path):
    result = run_scenario("cli_install", tmp_path, zip=str(extension_zip))
    assert result["exit_code"] == 0 and result["enabled"], result["log"][-2000:]
    assert result["operators"] == [True, True] and result["scene_settings"]


def test_matte_clip_in_blender_matches_the_service(extension_zip, plates, service, direct_rect, tmp_path):
    result = run_scenario("main", tmp_path, zip=str(extension_zip), plates=str(plates), endpoint=service)
    assert_installed(result["install"])
    assert result["first"]["outcome"] == ["FINISHED"], result["first"]
    folder = Path(result["folder"])
    assert folder == tmp_path / "oavm" / result["clip_id"]                # //oavm/<clip id>/ next to shot.blend
    assert result["files_first"] == [f"matte.{f:04d}.exr" for f in range(1, FRAMES + 1)]

    # the node group: input Image; outputs Image, Alpha and one alpha per object; reads the matte sequence
    group = result["group"]
    assert group["name"] == "OAVM Matte"
    assert sorted(map(tuple, group["sockets"])) == [("INPUT", "Image", "NodeSocketColor"),
                                                    ("OUTPUT", "Alpha", "NodeSocketFloat"),
                                                    ("OUTPUT", "Image", "NodeSocketColor"),
                                                    ("OUTPUT", "disc Alpha", "NodeSocketFloat")]
    assert Path(group["image"]) == folder / "matte.0001.exr"
    assert (group["frame_start"], group["frame_duration"], group["frame_offset"]) == (1, FRAMES, 0)
    # re-running (frames 1-2 only) rewrites those frames and updates the same group, which still spans 1-6
    assert result["second"]["outcome"] == ["FINISHED"]
    assert result["rewritten_by_second"] == ["matte.0001.exr", "matte.0002.exr"]
    assert result["group_after_second"]["groups_named_oavm"] == ["OAVM Matte"]
    assert result["group_after_second"]["frame_duration"] == FRAMES

    # frames 1-3 (the re-prompt below rewrote 4-6) hold the service's answer for the mask drawn in Blender
    for f in (1, 2, 3):
        written = read_matte_exr(folder / f"matte.{f:04d}.exr")
        assert list(written) == ["disc"]
        np.testing.assert_allclose(written["disc"], direct_rect[f]["disc"], atol=HALF_TOLERANCE)

    # compositor render of frame 3 through the group: the matte is the alpha, the colour premultiplied by it
    assert result["render"]["instance_inputs_from"] == ["CompositorNodeImage"]   # wired to the plate's node
    rendered = oiio.ImageBuf(result["render"]["path"]).get_pixels(oiio.FLOAT)
    matte3 = read_matte_exr(folder / "matte.0003.exr")["disc"]
    np.testing.assert_allclose(rendered[..., 3], matte3, atol=HALF_TOLERANCE)
    assert np.all(rendered[..., :3] <= rendered[..., 3:4] + 1e-4)
    assert matte3.max() > matte3.min()                                   # a real matte, not a constant

    # re-prompt at frame 4 with the corrected rectangle: frames 4-6 rewritten, 1-3 kept
    assert result["reprompt"]["outcome"] == ["FINISHED"], result["reprompt"]
    assert result["rewritten"] == ["matte.0004.exr", "matte.0005.exr", "matte.0006.exr"]
    expected = direct_mattes(service, plates, "ext-direct-4", [4, 5, 6], {"disc": rect_mask(19, 43)})
    for f in (4, 5, 6):
        np.testing.assert_allclose(read_matte_exr(folder / f"matte.{f:04d}.exr")["disc"], expected[f]["disc"],
                                   atol=HALF_TOLERANCE)

    # the add-on's rasterisation of a curved mask layer agrees with Blender's own Mask node
    raster = result["raster_vs_blender"]
    assert raster["ours"] > 500 and raster["disagree"] <= 0.01 * raster["blender"], raster


def test_errors_are_reports_that_say_what_to_do_and_leave_no_file(extension_zip, plates, service, tmp_path):
    result = run_scenario("errors", tmp_path, zip=str(extension_zip), plates=str(plates), endpoint=service,
                          dead_endpoint=f"tcp://127.0.0.1:{free_port()}")
    assert_installed(result["install"])
    expectations = {
        "service_down": "OAVM service not reachable",
        "autostart_fails": "/nonexistent/oavm serve",
        "range_outside": "covers scene frames 1-6",
        "range_reversed": "reversed",
        "mask_size": "(the mask image) is 32x24 but the clip is 64x48",
        "no_mask": "no Mask is chosen",
        "clip_missing": "Find Missing Files",
        "reprompt_without_mattes": "run 'Matte Clip' first",
    }
    for case, needle in expectations.items():
        outcome = result[case]
        assert outcome["outcome"] is None and outcome["error"], (case, outcome)     # an ERROR report
        assert needle in outcome["error"], (case, outcome["error"])
        assert "Traceback" not in outcome["error"]
    assert result["service_down"]["seconds"] < 30
    # the prompts land where they were drawn: the Mask layer (RECT) and the painted alpha, rows 12-35, cols 10-33
    assert result["prompt_boxes"] == {"disc": [12, 35, 10, 33], "alpha mask": [12, 35, 10, 33]}
    assert result["files"] == []


def test_worker_thread_and_timer_path_with_cancel(extension_zip, plates, service, tmp_path):
    result = run_scenario("threaded", tmp_path, zip=str(extension_zip), plates=str(plates), endpoint=service)
    level, message = result["full"]["outcome"]
    assert level == "INFO" and "matted 3 frame(s) 1-3" in message, message
    assert result["full"]["files"] == ["matte.0001.exr", "matte.0002.exr", "matte.0003.exr"]
    level, message = result["cancelled"]["outcome"]
    assert level == "WARNING" and "cancelled after" in message, message
    kept = result["cancelled"]["files"]
    assert 1 <= len(kept) < 3 and kept == [f"matte.{f:04d}.exr" for f in range(1, len(kept) + 1)]


def test_movie_clip_is_decoded_by_blender_and_matted(extension_zip, plates, service, direct_rect, tmp_path):
    result = run_scenario("movie", tmp_path, zip=str(extension_zip), plates=str(plates), endpoint=service)
    assert result["clip"] == {"source": "MOVIE", "size": [WIDTH, HEIGHT], "frames": FRAMES}
    assert result["run"]["outcome"] == ["FINISHED"], result["run"]
    assert result["files"] == ["matte.0001.exr", "matte.0002.exr", "matte.0003.exr"]     # the custom range 1-3
    assert result["temp_plates_left"] == []
    assert result["decode_lines"][-1].endswith(": 3/3 frame(s)") and result["handlers_left"] == 0   # progress shown
    # the movie is lossless (FFV1), so the mattes equal those of the PNG plates
    for f in (1, 2, 3):
        np.testing.assert_allclose(read_matte_exr(Path(result["folder"]) / f"matte.{f:04d}.exr")["disc"],
                                   direct_rect[f]["disc"], atol=0.02)
