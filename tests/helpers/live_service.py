"""Start a real OAVM service on loopback for a test, from any Python (also the bpy environment, which has no torch).

The service always runs in the service environment (``OAVM_SERVICE_PYTHON``, set by ``build.py test``; defaults to
the repo's ``.venv``) with a tiny randomly initialised checkpoint, so tests are fast and need no shipped weights.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]


def service_python() -> str:
    env = os.environ.get("OAVM_SERVICE_PYTHON")
    if env:
        return env
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random OAVM checkpoint written by the service environment (the caller may have no torch)."""
    code = (
        "import sys, torch\n"
        "from oavm_service.model import OAVM, OAVMConfig\n"
        "from oavm_service.checkpoint import save_checkpoint\n"
        f"torch.manual_seed({seed})\n"
        "m = OAVM(OAVMConfig.tiny()).eval()\n"
        "save_checkpoint(sys.argv[1], m, meta={'name': 'tiny-test'}, dtype=torch.float32)\n"
    )
    subprocess.run([service_python(), "-c", code, str(path)], check=True, cwd=REPO, timeout=300)
    return path


@contextmanager
def live_service(tmp: Path, *, checkpoint: Path | None = None, extra_args: list[str] = (),
                 ready_timeout: float = 120.0, endpoint: str | None = None) -> Iterator[str]:
    """Run ``python -m oavm_service serve`` on ``endpoint`` (default: a free loopback port); yield the endpoint; stop
    the service afterwards (it saves its clips to ``tmp/state``, where a service started again finds them)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint or make_tiny_checkpoint(tmp / "tiny.safetensors")
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp / "service.log", "w+")
    proc = subprocess.Popen(
        [service_python(), "-m", "oavm_service", "serve", "--endpoint", endpoint, "--checkpoint", str(ckpt),
         "--device", "cpu", "--state-dir", str(tmp / "state"), "--log-level", "info", *extra_args],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            log.seek(0)
            if "listening on" in log.read():
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"OAVM service did not start (exit {proc.poll()}):\n{log.read()}")
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
