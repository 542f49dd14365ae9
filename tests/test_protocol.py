# SPDX-License-Identifier: GPL-3.0-or-later
"""The wire protocol and the client's own behaviour (validation, Lazy Pirate, stale replies), on real sockets.

The client's counterpart here is a scripted ROUTER peer on loopback, so that lost and stale replies can be made
to happen on purpose; the real service is exercised in test_service.py and test_service_reliability.py.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from shared.client import OAVMClient
from shared.protocol import (PROTOCOL_VERSION, Buffer, ErrorCode, Limits, Message, OAVMServiceError,
                             OAVMServiceUnavailable, ProtocolError, decode_message, encode_message, error_header,
                             layer_buffers, layers_from_buffers, reply_header, request_header, to_mask, to_rgb)
from tests.helpers.live_service import free_port


def _send_recv(parts: list) -> list[zmq.Frame]:
    """Send ``parts`` over a real loopback PAIR connection (zero-copy both ways) and return what arrived."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        b.send_multipart(parts, copy=False)
        assert a.poll(5000)
        return a.recv_multipart(copy=False)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _raw(header: object, *buffers: bytes) -> list[bytes]:
    return [msgpack.packb(header), *buffers]


def _good_header(**extra) -> dict:
    return {"v": PROTOCOL_VERSION, "op": "matte", "id": "t-1", "clip": "c", "frame": 0, "args": {}, **extra}


# ------------------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8", "uint16"])
def test_round_trip_every_dtype_over_a_socket(dtype: str) -> None:
    rng = np.random.default_rng(1)
    frame = (rng.random((37, 53, 4)) * (255 if dtype.startswith("uint") else 1)).astype(dtype)
    mask = (rng.random((37, 53)) > 0.5).astype(dtype)
    header = request_header("open_clip", "abc-7", clip="shot/010", frame=-12, direction=-1, restart=True)
    parts = encode_message(header, [Buffer("frame", frame, "BGRA"), Buffer("mask", mask, "A", "hero")])
    msg = decode_message(_send_recv(parts))
    assert (msg.op, msg.request_id, msg.clip, msg.frame) == ("open_clip", "abc-7", "shot/010", -12)
    assert msg.args == {"direction": -1, "restart": True}
    got = msg.buffer("frame")
    assert got.array.dtype == np.dtype(dtype) and got.channels == "BGRA"
    np.testing.assert_array_equal(got.array, frame)
    np.testing.assert_array_equal(msg.per_object("mask")["hero"].array, mask)


def test_received_arrays_are_views_of_the_message() -> None:
    frame = np.arange(64 * 96 * 3, dtype=np.float32).reshape(64, 96, 3)
    received = _send_recv(encode_message(request_header("matte", 1, clip="c", frame=0), [Buffer("frame", frame)]))
    array = decode_message(received).buffer("frame").array
    assert not array.flags.owndata   # np.frombuffer over the zmq frame: no copy
    assert np.shares_memory(array, np.frombuffer(received[1].buffer, dtype=np.uint8))
    np.testing.assert_array_equal(array, frame)


def test_encode_makes_non_contiguous_arrays_contiguous_and_refuses_other_dtypes() -> None:
    frame = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32)[:, ::2]
    msg = decode_message(encode_message(request_header("matte", 1, clip="c", frame=0), [Buffer("frame", frame)]))
    np.testing.assert_array_equal(msg.buffer("frame").array, frame)
    with pytest.raises(ProtocolError, match="float32"):
        encode_message(request_header("matte", 1), [Buffer("frame", np.zeros((2, 2, 3), np.int64))])


def test_reply_layers_round_trip() -> None:
    layers = {"a": {"alpha": np.full((4, 6), 0.25, np.float32), "fgmask": np.ones((4, 6), np.float32)},
              "b": {"alpha": np.zeros((4, 6), np.float32), "fgmask": np.zeros((4, 6), np.float32),
                    "fg": np.full((4, 6, 3), 0.5, np.float32)}}
    request = request_header("matte", "r-9", clip="c", frame=4)
    parts = encode_message(reply_header(request, result={"next_frame": 5}), layer_buffers(layers))
    reply = decode_message(_send_recv(parts), request=False)
    assert reply.header["ok"] and reply.request_id == "r-9" and reply.header["result"] == {"next_frame": 5}
    got = layers_from_buffers(reply.buffers)
    assert set(got) == {"a", "b"} and set(got["b"]) == {"alpha", "fgmask", "fg"}
    np.testing.assert_array_equal(got["a"]["alpha"], layers["a"]["alpha"])
    np.testing.assert_array_equal(got["b"]["fg"], layers["b"]["fg"])


@pytest.mark.parametrize("parts, code, words", [
    ([], ErrorCode.BAD_REQUEST, "empty message"),
    ([b"\xc1\xff not msgpack"], ErrorCode.BAD_REQUEST, "not a msgpack header"),
    (_raw([1, 2, 3]), ErrorCode.BAD_REQUEST, "must be a msgpack map"),
    (_raw({**_good_header(), "v": 99}), ErrorCode.VERSION_MISMATCH, "protocol 99"),
    (_raw({k: v for k, v in _good_header().items() if k != "v"}), ErrorCode.VERSION_MISMATCH, "None"),
    (_raw(_good_header(op="explode")), ErrorCode.BAD_REQUEST, "unknown op 'explode'"),
    (_raw(_good_header(id=None)), ErrorCode.BAD_REQUEST, "'id'"),
    (_raw(_good_header(frame="3")), ErrorCode.BAD_REQUEST, "integer frame index"),
    (_raw(_good_header(clip="")), ErrorCode.BAD_REQUEST, "'clip'"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "float32", "shape": [2, 2, 3]}])),
     ErrorCode.BAD_REQUEST, "describes 1 buffer(s) but 0 part(s)"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "float32", "shape": [2, 2, 3]}]), b"\0" * 47),
     ErrorCode.BAD_REQUEST, "48 bytes but 47 bytes arrived"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "float64", "shape": [1, 1, 3]}]), b"\0" * 24),
     ErrorCode.BAD_REQUEST, "dtype 'float64'"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "uint8", "shape": [2, -2, 3]}]), b""),
     ErrorCode.BAD_REQUEST, "non-negative integers"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "uint8", "shape": [2, 2, 3], "channels": "RG"}]),
          b"\0" * 12), ErrorCode.BAD_REQUEST, "one letter per channel"),
    (_raw(_good_header(buffers=[{"name": "frame", "dtype": "float32", "shape": [100000, 100000, 3]}]), b"\0" * 12),
     ErrorCode.TOO_LARGE, "100000x100000"),
])
def test_malformed_messages_are_refused_with_a_code_and_advice(parts: list, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(parts)
    assert info.value.code == code
    assert words in info.value.message


def test_limits_are_checked_before_the_buffers() -> None:
    header = _good_header(buffers=[{"name": "frame", "dtype": "float32", "shape": [100, 100, 3]}])
    with pytest.raises(ProtocolError) as info:   # 117 KiB declared, a 1 KiB limit; the buffer is not even there
        decode_message(_raw(header, b"tiny"), Limits(max_message_bytes=1024))
    assert info.value.code == ErrorCode.TOO_LARGE and "--max-message-mb" in info.value.message
    assert info.value.header["id"] == "t-1"   # readable header: the error reply can carry the request id


def test_error_reply_becomes_service_error() -> None:
    from shared.protocol import raise_for_error

    reply = decode_message(encode_message(error_header({"id": 3, "op": "matte"}, ErrorCode.OUT_OF_ORDER,
                                                       "send frame 4")), request=False)
    with pytest.raises(OAVMServiceError) as info:
        raise_for_error(reply)
    assert info.value.code == ErrorCode.OUT_OF_ORDER and info.value.message == "send frame 4"


# ------------------------------------------------------------------------------------------------ pixels
def test_channel_orders_become_rgb() -> None:
    rgba = np.random.default_rng(2).random((5, 7, 4)).astype(np.float32)
    view = to_rgb(rgba, "RGBA")
    assert np.shares_memory(view, rgba)                       # RGB first: no copy
    np.testing.assert_array_equal(view, rgba[..., :3])
    np.testing.assert_array_equal(to_rgb(rgba[..., :3][..., ::-1].copy(), "BGR"), rgba[..., :3])
    abgr = rgba[..., [3, 2, 1, 0]].copy()
    np.testing.assert_array_equal(to_rgb(abgr, "abgr"), rgba[..., :3])
    np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])   # unnamed 4 channels: RGBA
    for bad in ("RGB", "RRGB", "XYZW"):
        with pytest.raises(ProtocolError, match="name R, G and B once each"):
            to_rgb(rgba, bad)
    with pytest.raises(ProtocolError, match="height, width"):
        to_rgb(rgba[..., 0])


def test_masks_take_one_channel() -> None:
    m = np.zeros((3, 4, 1), np.uint8)
    assert to_mask(m).shape == (3, 4)
    with pytest.raises(ProtocolError, match="object 'hero'"):
        to_mask(np.zeros((3, 4, 2)), "hero")


# ------------------------------------------------------------------------------------------------ client
@contextmanager
def scripted_peer(behaviour: Callable[[zmq.Socket, list[zmq.Frame], int], None], n_requests: int
                  ) -> Iterator[tuple[str, list[Message], list[bytes]]]:
    """A ROUTER on loopback that hands each of the first ``n_requests`` requests to ``behaviour``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[Message] = []
    identities: list[bytes] = []

    def loop() -> None:
        for i in range(n_requests):
            if not sock.poll(10_000):
                return
            parts = sock.recv_multipart(copy=False)
            identities.append(parts[0].bytes)
            seen.append(decode_message(parts[1:]))
            behaviour(sock, parts, i)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", seen, identities
    finally:
        thread.join(15)
        sock.close(0)
        ctx.term()


def _answer(sock: zmq.Socket, parts: list[zmq.Frame], *, request_id=None, result=None, version=None) -> None:
    request = decode_message(parts[1:]).header
    header = reply_header({**request, "id": request_id if request_id is not None else request["id"]},
                          result=result or {"echo": request["id"]})
    out = encode_message(header)
    if version is not None:
        out[0] = msgpack.packb({**msgpack.unpackb(out[0]), "v": version})
    sock.send_multipart([parts[0], *out])


def test_client_refuses_bad_inputs_before_sending() -> None:
    frame = np.zeros((8, 8, 3), np.float32)
    cases = [
        (lambda c: c.matte("c", 0, np.zeros((8, 8), np.float32)), "height, width, channels"),
        (lambda c: c.matte("c", 0, np.zeros((8, 8, 3), np.int64)), "dtype int64"),
        (lambda c: c.matte("c", 0, np.zeros((8, 8, 4), np.float32), channels="RGB"), "do not fit"),
        (lambda c: c.matte("c", 0, np.zeros((8, 8, 5), np.float32)), "do not fit"),
        (lambda c: c.matte("", 0, frame), "clip id"),
        (lambda c: c.matte("c", 1.5, frame), "frame index"),
        (lambda c: c.open_clip("c", 0, frame, {"a": np.zeros((4, 8))}), "has shape (4, 8) but the frame is (8, 8)"),
        (lambda c: c.open_clip("c", 0, frame, {}), "at least one object mask"),
        (lambda c: c.open_clip("c", 0, frame, {"a": np.zeros((8, 8))}, direction=2), "+1 (forward) or -1"),
        (lambda c: c.open_clip("c", 0, frame, {"a": np.zeros((8, 8))}, downsample_ratio=2), "(0, 1]"),
        (lambda c: c.add_object("c", 0, frame, "", np.zeros((8, 8))), "object id"),
    ]
    with OAVMClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2, retries=0, connect_timeout_s=0.2) as client:
        for call, words in cases:
            with pytest.raises(OAVMServiceError, match=None) as info:
                call(client)
            assert words in info.value.message, (words, info.value.message)
            assert not isinstance(info.value, OAVMServiceUnavailable)


def test_client_converts_bool_masks_and_float64_frames() -> None:
    def reply(sock, parts, i):
        _answer(sock, parts)

    with scripted_peer(reply, 1) as (endpoint, seen, _):
        with OAVMClient(endpoint, timeout_s=5, shared_memory=False) as client:
            mask = np.zeros((6, 9), bool)
            mask[2:4, 3:5] = True
            client.open_clip("c", 0, np.full((6, 9, 3), 0.5), {"hero": mask})
    frame, sent_mask = seen[0].buffer("frame"), seen[0].per_object("mask")["hero"]
    assert frame.array.dtype == np.float32 and frame.channels == "RGB"
    assert sent_mask.array.dtype == np.uint8 and sent_mask.array.max() == 255 and sent_mask.array.sum() == 4 * 255


def test_a_service_that_offers_no_shared_memory_gets_the_frames_in_the_messages() -> None:
    """An older service (its status knows no ``shared_memory``) is asked once, then sent pixels as before."""
    with scripted_peer(lambda sock, parts, i: _answer(sock, parts), 3) as (endpoint, seen, _):
        with OAVMClient(endpoint, timeout_s=5) as client:
            frame = np.full((6, 9, 3), 0.25, np.float32)
            client.open_clip("c", 0, frame, {"hero": np.ones((6, 9), np.float32)})
            client.matte("c", 1, frame)
            assert client.shm_verdict == "not used: the service does not offer it"
    probe = seen[0].args["shm_probe"]
    assert seen[0].op == "status" and set(probe) == {"path", "size", "token"}
    assert [m.op for m in seen[1:]] == ["open_clip", "matte"] and "shm" not in seen[1].header
    np.testing.assert_array_equal(seen[2].buffer("frame").array, frame)
    assert not os.path.exists(probe["path"])                  # the unused segment was removed at once


def test_no_service_raises_unavailable_quickly_with_advice() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with OAVMClient(endpoint, timeout_s=0.5, retries=2, connect_timeout_s=0.3) as client:
        with pytest.raises(OAVMServiceUnavailable) as info:
            client.status()
    assert time.monotonic() - started < 5
    assert "no OAVM service answers at " + endpoint in info.value.message and "oavm serve" in info.value.message
    assert isinstance(info.value, ConnectionError)


def test_lazy_pirate_resends_on_a_fresh_socket_after_silence() -> None:
    def drop_first(sock, parts, i):
        if i > 0:
            _answer(sock, parts)

    with scripted_peer(drop_first, 2) as (endpoint, seen, identities):
        with OAVMClient(endpoint, timeout_s=0.5, retries=2) as client:
            assert client.status()["echo"] == seen[0].request_id
    assert seen[0].request_id == seen[1].request_id          # the same request, resent ...
    assert identities[0] != identities[1]                    # ... from a new socket


def test_replies_to_older_requests_are_discarded() -> None:
    def stale_then_right(sock, parts, i):
        _answer(sock, parts, request_id="someone-else-1", result={"stale": True})
        _answer(sock, parts)

    with scripted_peer(stale_then_right, 1) as (endpoint, seen, _):
        with OAVMClient(endpoint, timeout_s=5) as client:
            result = client.status()
    assert result == {"echo": seen[0].request_id}


def test_reply_of_another_protocol_version_is_a_clear_error() -> None:
    def future_service(sock, parts, i):
        _answer(sock, parts, version=PROTOCOL_VERSION + 1)

    with scripted_peer(future_service, 1) as (endpoint, _, _):
        with OAVMClient(endpoint, timeout_s=5) as client:
            with pytest.raises(OAVMServiceError) as info:
                client.status()
    assert info.value.code == ErrorCode.VERSION_MISMATCH and "install matching versions" in info.value.message


def test_error_replies_raise_service_error_with_code() -> None:
    def refuse(sock, parts, i):
        request = decode_message(parts[1:]).header
        sock.send_multipart([parts[0], *encode_message(error_header(request, ErrorCode.UNKNOWN_CLIP, "open it"))])

    with scripted_peer(refuse, 1) as (endpoint, _, _):
        with OAVMClient(endpoint, timeout_s=5) as client:
            with pytest.raises(OAVMServiceError) as info:
                client.close_clip("nope")
    assert (info.value.code, info.value.message) == (ErrorCode.UNKNOWN_CLIP, "open it")


def test_frames_beyond_the_service_limit_are_refused_before_sending() -> None:
    def small_service(sock, parts, i):
        _answer(sock, parts, result={"limits": {"max_message_bytes": 8 << 20}})

    big = np.zeros((1200, 1600, 3), np.float32)   # 22 MiB: the client asks for the limits first
    with scripted_peer(small_service, 1) as (endpoint, seen, _):
        with OAVMClient(endpoint, timeout_s=5) as client:
            with pytest.raises(OAVMServiceError) as info:
                client.matte("c", 0, big)
    assert info.value.code == ErrorCode.TOO_LARGE and "--max-message-mb" in info.value.message
    assert [m.op for m in seen] == ["status"]


def test_autostart_command_that_dies_is_reported_with_its_log() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-c", "import sys; print('no GPU today'); sys.exit(3)"]
    with OAVMClient(endpoint, timeout_s=0.5, retries=0, connect_timeout_s=0.3, autostart=command,
                    autostart_wait_s=30) as client:
        with pytest.raises(OAVMServiceUnavailable) as info:
            client.status()
        assert client.autostarted is not None and client.autostarted.returncode == 3
    assert "exited with code 3" in info.value.message and "oavm-service-autostart.log" in info.value.message
