# SPDX-License-Identifier: GPL-3.0-or-later
"""The service under stress: LRU eviction and transparent restore, clients that vanish or stop reading, SIGTERM
with saved states and a restart that continues them, the loopback-only rule, CURVE keys and client autostart.

Every service here is a real ``python -m oavm_service serve`` process on loopback with a tiny random checkpoint.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from shared.client import OAVMClient, load_curve_keys
from shared.protocol import (PROTOCOL_VERSION, Buffer, ErrorCode, OAVMServiceError, OAVMServiceUnavailable,
                             decode_message, encode_message, layers_from_buffers, request_header)
from tests.helpers.live_service import REPO, free_port, live_service, service_python
from tests.test_service import (ReferenceClip, assert_same, checkpoint, engine, one_torch_thread,  # noqa: F401
                                synthetic_clip)                                  # (the fixtures are shared too)


def serve_command(endpoint: str, checkpoint: Path, state_dir: Path, *extra: str) -> list[str]:
    """The command live_service runs, for the tests that need the process itself (exit code, signals)."""
    return [service_python(), "-m", "oavm_service", "serve", "--endpoint", endpoint, "--checkpoint", str(checkpoint),
            "--device", "cpu", "--state-dir", str(state_dir), "--log-level", "info", *extra]


def start_service(tmp: Path, checkpoint: Path, state_dir: Path, name: str) -> tuple[subprocess.Popen, str, Path]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(endpoint, checkpoint, state_dir), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"service did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, endpoint, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def raw_socket(ctx: zmq.Context, kind: int, endpoint: str, keys: dict) -> zmq.Socket:
    """A plain pyzmq socket with this client's CURVE keys, connected to ``endpoint``."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.curve_serverkey = keys["server_public_key"]
    sock.curve_publickey, sock.curve_secretkey = keys["client_keys"]
    sock.connect(endpoint)
    return sock


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("curve") / "keys"
    made = subprocess.run([service_python(), "-m", "oavm_service", "keygen", str(keys)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return keys


@pytest.fixture(scope="module")
def small_service(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, key_dir: Path
                  ) -> Iterator[tuple[str, Path, dict]]:
    """A service with small limits (two clips, 200000-pixel frames, 1 MiB messages) that admits only CURVE
    clients with a key in ``key_dir``."""
    tmp = tmp_path_factory.mktemp("small")
    limits = ["--max-clips", "2", "--max-frame-pixels", "200000", "--max-message-mb", "1"]
    with live_service(tmp, checkpoint=checkpoint, extra_args=[*limits, "--curve-dir", str(key_dir)]) as endpoint:
        yield endpoint, tmp / "service.log", load_curve_keys(key_dir)


# ------------------------------------------------------------------------------------------------ tests
def test_lru_eviction_and_restore_give_the_never_evicted_mattes(small_service, engine) -> None:
    endpoint, log, keys = small_service
    clips = {name: synthetic_clip(seed, 4, ("o1", "o2")) for seed, name in enumerate(("x", "y", "z"), 20)}
    refs = {name: ReferenceClip(engine) for name in clips}
    with OAVMClient(endpoint, timeout_s=60, **keys) as client:
        for name, clip in clips.items():     # three clips, two slots: every turn evicts one and restores another
            assert_same(client.open_clip(name, 0, clip.frames[0], clip.masks[0]),
                        refs[name].step(clip.frames[0], clip.masks[0]))
        for t in (1, 2, 3):
            for name, clip in clips.items():
                assert_same(client.matte(name, t, clip.frames[t]), refs[name].step(clip.frames[t]))
        status = client.status()
        assert status["clips_held"] == 2 and status["clips_saved"] >= 1
        for name in clips:
            client.close_clip(name)
    text = log.read_text()
    assert "evicted clip 'x'" in text and "restored clip 'x'" in text


def test_frames_and_messages_beyond_the_limits_are_refused(small_service) -> None:
    endpoint, _, keys = small_service
    with OAVMClient(endpoint, timeout_s=30, **keys) as client:
        for shape, words in (((500, 500, 3), "--max-frame-pixels"), ((400, 500, 3), "--max-message-mb")):
            frame = np.zeros(shape, np.float32)
            with pytest.raises(OAVMServiceError) as info:
                client.open_clip("big", 0, frame, {"o": np.ones(shape[:2], np.uint8)})
            assert info.value.code == ErrorCode.TOO_LARGE and words in info.value.message
        assert client.status()["limits"] == {"max_clips": 2, "max_frame_pixels": 200000, "max_message_bytes": 1 << 20}


def test_a_client_killed_mid_request_does_not_stop_the_service(small_service, key_dir: Path, engine) -> None:
    endpoint, log, keys = small_service
    doomed = textwrap.dedent(f"""
        import sys, time, numpy as np, zmq
        sys.path.insert(0, {str(REPO)!r})
        from shared.client import load_curve_keys
        from shared.protocol import Buffer, encode_message, request_header
        keys = load_curve_keys({str(key_dir)!r})
        sock = zmq.Context().socket(zmq.DEALER)
        sock.curve_serverkey = keys["server_public_key"]
        sock.curve_publickey, sock.curve_secretkey = keys["client_keys"]
        sock.connect({endpoint!r})
        frame = np.random.default_rng(0).random((192, 256, 3)).astype(np.float32)
        mask = np.zeros((192, 256), np.float32); mask[50:120, 60:160] = 1
        sock.send_multipart(encode_message(request_header("open_clip", "doomed-1", clip="doomed", frame=0),
                                           [Buffer("frame", frame), Buffer("mask", mask, "A", "o")]), copy=False)
        print("sent", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", doomed], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        time.sleep(0.2)
    finally:
        proc.kill()                          # gone while the service works on its request
        proc.wait(30)
    clip, ref = synthetic_clip(30, 2), ReferenceClip(engine)
    with OAVMClient(endpoint, timeout_s=60, **keys) as client:
        assert_same(client.open_clip("after-kill", 0, clip.frames[0], clip.masks[0]),
                    ref.step(clip.frames[0], clip.masks[0]))
        assert_same(client.matte("after-kill", 1, clip.frames[1]), ref.step(clip.frames[1]))
        client.close_clip("after-kill")
        client.close_clip("doomed")
    assert "open_clip clip=doomed frame=0" in log.read_text()    # it was served; its reply had nowhere to go


def test_a_client_that_never_reads_does_not_block_others(small_service) -> None:
    endpoint, _, keys = small_service
    ctx = zmq.Context()
    greedy = raw_socket(ctx, zmq.DEALER, endpoint, keys)
    greedy.rcvhwm = 1
    try:
        for i in range(500):
            greedy.send_multipart(encode_message(request_header("status", f"greedy-{i}")))
        started = time.monotonic()
        with OAVMClient(endpoint, timeout_s=30, retries=0, **keys) as client:
            for _ in range(3):
                assert client.status()["protocol"] == PROTOCOL_VERSION
        assert time.monotonic() - started < 20
    finally:
        greedy.close(0)
        ctx.term()
    with OAVMClient(endpoint, timeout_s=30, **keys) as client:
        assert client.status()["protocol"] == PROTOCOL_VERSION


def test_curve_keys_admit_only_known_clients(small_service, key_dir: Path) -> None:
    endpoint, _, keys = small_service
    for secret in (key_dir / "server.key_secret", key_dir / "clients" / "client.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with OAVMClient(endpoint, timeout_s=30, **keys) as client:
        assert client.status()["protocol"] == PROTOCOL_VERSION
    for kwargs in ({}, {"server_public_key": keys["server_public_key"]}):   # plaintext; a key it does not know
        with OAVMClient(endpoint, timeout_s=1, retries=0, connect_timeout_s=1, **kwargs) as stranger:
            with pytest.raises(OAVMServiceUnavailable):
                stranger.status()


def test_sigterm_saves_every_clip_and_an_autostarted_service_continues_them(tmp_path: Path, checkpoint: Path,
                                                                           engine) -> None:
    state_dir = tmp_path / "state"
    clips = {"shot": synthetic_clip(40, 4), "other": synthetic_clip(41, 3)}
    refs = {name: ReferenceClip(engine) for name in clips}
    proc, endpoint, log = start_service(tmp_path, checkpoint, state_dir, "first")
    try:
        with OAVMClient(endpoint, timeout_s=60) as client:
            for name, clip in clips.items():
                assert_same(client.open_clip(name, 0, clip.frames[0], clip.masks[0]),
                            refs[name].step(clip.frames[0], clip.masks[0]))
                assert_same(client.matte(name, 1, clip.frames[1]), refs[name].step(clip.frames[1]))
        # a request in flight when the signal arrives is finished (or, if still queued, answered "busy")
        ctx = zmq.Context()
        late = ctx.socket(zmq.DEALER)
        late.linger = 0
        late.connect(endpoint)
        late.send_multipart(encode_message(request_header("matte", "late-1", clip="shot", frame=2),
                                           [Buffer("frame", clips["shot"].frames[2])]))
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert late.poll(10_000), "the request in flight at SIGTERM got no reply"
        reply = decode_message(late.recv_multipart(copy=False), request=False)
        late.close(0)
        ctx.term()
    finally:
        stop(proc)
    assert "saved 2 clip state(s)" in log.read_text()
    assert len(list(state_dir.glob("*.oavmclip"))) == 2
    if reply.header["ok"]:                        # it was served before the stop: the clip moved on by one frame
        expected = refs["shot"].step(clips["shot"].frames[2])
        np.testing.assert_array_equal(layers_from_buffers(reply.buffers)["hero"]["alpha"], expected["hero"]["alpha"])
        next_shot = 3
    else:
        assert reply.header["error"]["code"] == ErrorCode.BUSY and "start it again" in reply.header["error"]["message"]
        next_shot = 2

    # a plug-in after a reboot: nothing answers, so its client starts the service (detached) on the same state dir
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = serve_command(endpoint, checkpoint, state_dir)
    with OAVMClient(endpoint, timeout_s=60, connect_timeout_s=1, autostart=command) as client:
        try:
            for t in range(next_shot, 4):                    # no open_clip: the saved clips continue
                assert_same(client.matte("shot", t, clips["shot"].frames[t]),
                            refs["shot"].step(clips["shot"].frames[t]))
            other = clips["other"].frames[2]
            assert_same(client.matte("other", 2, other), refs["other"].step(other))
            started = client.autostarted
            assert started is not None and started.poll() is None
            assert os.getsid(started.pid) == started.pid     # detached: it leads its own session
            with OAVMClient(endpoint, timeout_s=30, autostart=command) as second:   # found running: not started again
                assert second.status()["pid"] == started.pid and second.autostarted is None
        finally:
            if client.autostarted is not None:
                client.autostarted.send_signal(signal.SIGINT)    # Ctrl-C behaves like SIGTERM
                assert client.autostarted.wait(60) == 0


@pytest.mark.parametrize("endpoint_host, extra, words", [
    ("0.0.0.0", [], "--allow-remote"),
    ("*", [], "--allow-remote"),
    ("0.0.0.0", ["--allow-remote"], "oavm keygen"),
])
def test_listening_beyond_loopback_needs_allow_remote_and_keys(tmp_path: Path, endpoint_host: str, extra: list[str],
                                                               words: str) -> None:
    cmd = serve_command(f"tcp://{endpoint_host}:{free_port()}", tmp_path / "unused.safetensors", tmp_path, *extra)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert words in done.stderr and "listening on" not in done.stdout
