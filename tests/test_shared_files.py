# SPDX-License-Identifier: GPL-3.0-or-later
"""shared.files: the one hidden-temporary naming of every OAVM writer, what a failed write leaves (nothing) and
what a rerun removes (the temporaries a killed run left of the frames it is about to write, and no others)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.files import describe_removed, left_temporaries, remove_left_temporaries, temporary_path

REPO = Path(__file__).resolve().parents[1]


def test_temporary_path_is_hidden_beside_the_file_and_names_this_process(tmp_path):
    tmp = temporary_path(str(tmp_path / "out" / "matte.1001.exr"))
    assert tmp == tmp_path / "out" / f".matte.1001.exr.oavm-tmp-{os.getpid()}"


def test_left_temporaries_names_only_other_processes_files_of_these_outputs(tmp_path):
    outputs = [tmp_path / "a" / f"m.{f}.exr" for f in (1001, 1002)] + [str(tmp_path / "missing" / "m.1001.exr")]
    (tmp_path / "a").mkdir()
    names = [".m.1001.exr.oavm-tmp-12", ".m.1002.exr.oavm-tmp-7", f".m.1001.exr.oavm-tmp-{os.getpid()}",
             ".m.1003.exr.oavm-tmp-12", ".m.1001.exr.oavm-tmp-x", "m.1001.exr", ".m.1001.exr.tmp12"]
    for name in names:
        (tmp_path / "a" / name).write_bytes(b"")
    expected = [tmp_path / "a" / ".m.1001.exr.oavm-tmp-12", tmp_path / "a" / ".m.1002.exr.oavm-tmp-7"]
    assert left_temporaries(outputs) == expected and left_temporaries([]) == []
    assert remove_left_temporaries(iter(outputs)) == expected
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(set(names) - {p.name for p in expected})
    assert describe_removed(expected) == ("removed 2 half-written file(s) an interrupted run left: "
                                          ".m.1001.exr.oavm-tmp-12, .m.1002.exr.oavm-tmp-7")
    assert describe_removed(expected * 2).endswith(", ...")


WRITERS = {
    "service": "from oavm_service.io.images import write_image\n"
               "write_image(path, np.random.default_rng(0).random((512, 512, 4)), list('RGBA'), compression='none')\n",
    "nuke": "sys.path.insert(0, 'plugin_nuke')\nfrom oavm_nuke import exr\n"
            "exr.write_exr(path, {c: np.random.default_rng(0).random((512, 512), np.float32) for c in 'RGB'},\n"
            "              pixel_type=exr.FLOAT, compression=exr.NONE)\n",
    "nuke-manifest": "sys.path.insert(0, 'plugin_nuke')\nfrom oavm_nuke.cache import Manifest\n"
                     "m = Manifest('clip'); m.frames = {f: {'key': 'k' * 64, 'path': 'p' * 200} for f in range(999)}\n"
                     "m.save(path)\n",
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_that_fails_for_want_of_room_leaves_no_file(tmp_path, writer):
    """A full disk (a 64 KiB file-size limit stands in for it): the writer's error, and neither a final file nor a
    partial temporary holding the space."""
    script = ("import resource, signal, sys\nimport numpy as np\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "path = sys.argv[1]\n"
              "try:\n" + "".join("    " + line + "\n" for line in WRITERS[writer].splitlines()) +
              "except Exception as exc:\n"
              "    print('failed:', type(exc).__name__, exc)\n")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(out / "matte.1001.exr")], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("failed:"), done.stdout
    assert not list(out.iterdir())
