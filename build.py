#!/usr/bin/env python3
"""One entry point for every set-up step of OAVM: ``python3 build.py {setup,demo,test,dist,bench}``.

Standard library only, so it runs on a fresh machine before anything is installed.

* ``setup``  creates ``.venv`` (the service: torch, OpenImageIO, pyzmq, ...) and ``.venv-blender`` (real ``bpy``
  for the Blender tests; bpy pins numpy < 2, which cannot share an environment with OpenImageIO 3.2).
  Each environment is rebuilt only when its requirements file changed.
* ``demo``   mattes the bundled sample clip (``samples/judo``) with the shipped checkpoint.
* ``test``   runs the whole suite: service tests in ``.venv``, Blender tests in ``.venv-blender``.
* ``dist``   builds the Blender extension zip and the Nuke plug-in zip into ``dist/`` (vendoring ``shared/``).
* ``bench``  prints the speed/memory table (``bench/``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_BLENDER = ROOT / ".venv-blender"
REQ = ROOT / "requirements"
PYTHON_NEEDED = (3, 11)


def _say(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def _py(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str | os.PathLike], **kw) -> int:
    _say("$ " + " ".join(str(c) for c in cmd))
    return subprocess.call([str(c) for c in cmd], cwd=kw.pop("cwd", ROOT), **kw)


def _check(cmd: list[str | os.PathLike], **kw) -> None:
    rc = _run(cmd, **kw)
    if rc != 0:
        _say(f"failed with exit code {rc}")
        sys.exit(rc)


def _ensure_env(env: Path, req_files: list[Path], *, editable: bool, no_deps: list[Path] = ()) -> Path:
    """Create ``env`` and install the pinned requirements, unless its stamp says it is current."""
    digest = hashlib.sha256()
    for f in [*req_files, *no_deps, ROOT / "pyproject.toml"]:
        digest.update(f.read_bytes())
    stamp = env / ".oavm-requirements.sha256"
    if stamp.exists() and stamp.read_text().strip() == digest.hexdigest() and _py(env).exists():
        return _py(env)
    if sys.version_info[:2] != PYTHON_NEEDED:
        _say(f"note: this is Python {sys.version.split()[0]}; the pins are made for {PYTHON_NEEDED[0]}.{PYTHON_NEEDED[1]}")
    _say(f"creating {env.name} (first run only; this takes a few minutes)")
    venv.EnvBuilder(with_pip=True, clear=not stamp.exists() and env.exists()).create(env)
    py = _py(env)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    for f in req_files:
        _check([*pip, "-r", f])
    for f in no_deps:
        _check([*pip, "--no-deps", "-r", f])
    if editable:
        _check([*pip, "--no-deps", "--no-build-isolation", "-e", ROOT])
    stamp.write_text(digest.hexdigest())
    return py


def service_env() -> Path:
    return _ensure_env(VENV, [REQ / "service.txt"], editable=True, no_deps=[REQ / "rvm.txt"])


def blender_env() -> Path:
    return _ensure_env(VENV_BLENDER, [REQ / "blender.txt"], editable=False)


def cmd_setup(_args: list[str]) -> int:
    service_env()
    blender_env()
    _say("environments ready: .venv (service) and .venv-blender (Blender tests)")
    return 0


def cmd_demo(args: list[str]) -> int:
    py = service_env()
    return _run([py, "-m", "oavm_service", "demo", *args])


def cmd_test(args: list[str]) -> int:
    """Service suite first, then the Blender suite in its own environment; one summary line at the end."""
    py = service_env()
    bpy_py = blender_env()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OAVM_SERVICE_PYTHON=str(py))
    rc_main = _run([py, "-m", "pytest", "-q", "tests", "--ignore=tests/blender", *args], env=env)
    rc_blender = _run([bpy_py, "-m", "pytest", "-q", "tests/blender", *args], env=env)
    ok = rc_main == 0 and rc_blender == 0
    _say(f"service suite: exit {rc_main}; Blender suite: exit {rc_blender}; {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_dist(args: list[str]) -> int:
    py = service_env()
    return _run([py, ROOT / "tools" / "dist.py", *args])


def cmd_bench(args: list[str]) -> int:
    py = service_env()
    return _run([py, "-m", "bench", *args])


COMMANDS = {"setup": cmd_setup, "demo": cmd_demo, "test": cmd_test, "dist": cmd_dist, "bench": cmd_bench}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print("usage: python3 build.py {" + ",".join(COMMANDS) + "} [args...]")
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
