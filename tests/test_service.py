# SPDX-License-Identifier: GPL-3.0-or-later
"""The real service on loopback, a tiny random model: mattes equal the engine's in-process, and bad input of every
kind gets a clear error reply after which the next good request is answered.

One service (``python -m oavm_service serve``) for the whole module; the reference is an Engine in this process
loaded from the same checkpoint, fp32 on the CPU, fed exactly what the service is fed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from shared.client import MatteResult, OAVMClient
from shared.protocol import (PROTOCOL_VERSION, Buffer, ErrorCode, Message, OAVMServiceError, decode_message,
                             encode_message, request_header)
from tests.helpers.live_service import live_service

H, W = 48, 64          # small frames: the shared CPU runs every test file in well under a minute


# ------------------------------------------------------------------------------------------------ helpers
@dataclass
class SyntheticClip:
    """Smooth random frames with discs that move a little each frame, and the discs' masks."""
    frames: list[np.ndarray]                 # (H, W, 3) float32 in [0, 1]
    masks: list[dict[str, np.ndarray]]       # per frame: object id -> (H, W) float32 {0, 1}


def synthetic_clip(seed: int, n_frames: int, objects: tuple[str, ...] = ("hero",), h: int = H, w: int = W
                   ) -> SyntheticClip:
    rng = np.random.default_rng(seed)
    background = rng.random((h // 8, w // 8, 3)).astype(np.float32).repeat(8, 0).repeat(8, 1)
    centres = rng.uniform([h * 0.3, w * 0.3], [h * 0.7, w * 0.7], size=(len(objects), 2))
    colours = rng.random((len(objects), 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    frames, masks = [], []
    for t in range(n_frames):
        frame, named = background.copy(), {}
        for k, obj in enumerate(objects):
            cy, cx = centres[k] + t * np.array([0.7, 1.3]) * (k + 1)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) * 0.18) ** 2).astype(np.float32)
            frame = frame * (1 - disc[..., None]) + colours[k] * disc[..., None]
            named[obj] = disc
        frames.append(np.clip(frame + rng.normal(0, 0.01, frame.shape), 0, 1).astype(np.float32))
        masks.append(named)
    return SyntheticClip(frames, masks)


class ReferenceClip:
    """The same clip run in this process: what the service must answer for it."""

    def __init__(self, engine, *, downsample_ratio: float | None = None, want_foreground: bool = False):
        self.session = engine.new_session(downsample_ratio=downsample_ratio)
        self.want_foreground = want_foreground

    def step(self, frame: np.ndarray, prompts: dict[str, np.ndarray] | None = None) -> dict:
        return self._layers(self.session.step(frame, prompts))

    def add_object(self, obj_id: str, frame: np.ndarray, mask: np.ndarray) -> dict:
        return self._layers(self.session.add_object(obj_id, frame, mask))

    def reprompt(self, obj_id: str, frame: np.ndarray, mask: np.ndarray) -> dict:
        return self._layers(self.session.reprompt(obj_id, frame, mask))

    def _layers(self, mattes: dict) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for obj, m in mattes.items():
            out[obj] = {"alpha": m.alpha, "fgmask": m.fgmask}
            if self.want_foreground:
                out[obj]["fg"] = m.foreground * m.alpha[..., None]
        return out


def assert_same(result: MatteResult, expected: dict[str, dict[str, np.ndarray]]) -> None:
    assert set(result.layers) == set(expected)
    for obj, layers in expected.items():
        assert set(result.layers[obj]) == set(layers), obj
        for name, array in layers.items():
            got = result.layers[obj][name]
            assert got.dtype == np.float32 and got.shape == array.shape, (obj, name)
            np.testing.assert_array_equal(got, array, err_msg=f"{obj}.{name}")


def raw_request(endpoint: str, parts: list, timeout_s: float = 30.0) -> Message:
    """Send ``parts`` exactly as given from a raw DEALER and return the decoded reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart(parts)
        assert sock.poll(int(timeout_s * 1000)), "the service did not answer a malformed request"
        return decode_message(sock.recv_multipart(copy=False), request=False)
    finally:
        sock.close(0)
        ctx.term()


def reference_engine(checkpoint: Path):
    from oavm_service.engine import Engine

    return Engine.from_checkpoint(checkpoint, device="cpu", precision="fp32")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread here and in the services started meanwhile (they inherit OMP_NUM_THREADS).

    On the shared 2-core machine torch's default of 2 spinning threads per process turns a 0.1 s tiny-model step
    into 2-10 s; one thread on both sides also keeps the service's arithmetic in the same order as this process's.
    """
    import torch

    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A tiny random checkpoint, written in this process (which has torch loaded anyway)."""
    import torch

    from oavm_service.checkpoint import save_checkpoint
    from oavm_service.model import OAVM, OAVMConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, OAVM(OAVMConfig.tiny()).eval(), meta={"name": "tiny-test"}, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    return reference_engine(checkpoint)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[str]:
    with live_service(tmp_path_factory.mktemp("service"), checkpoint=checkpoint) as endpoint:
        yield endpoint


@pytest.fixture
def client(service: str) -> Iterator[OAVMClient]:
    with OAVMClient(service, timeout_s=60, retries=1) as c:
        yield c


# ------------------------------------------------------------------------------------------------ tests
def test_two_clients_three_clips_interleaved_match_the_engine(service: str, engine) -> None:
    a, b, c = synthetic_clip(1, 4), synthetic_clip(2, 4, ("left", "right", "late")), synthetic_clip(3, 4)
    ref_a = ReferenceClip(engine)
    ref_b = ReferenceClip(engine, downsample_ratio=0.5)
    ref_c = ReferenceClip(engine, want_foreground=True)
    b16 = [(f * 65535).astype(np.uint16) for f in b.frames]           # clip B travels as uint16 RGB
    c8 = [(f * 255).astype(np.uint8) for f in c.frames]               # clip C as uint8 BGR, backwards
    with OAVMClient(service, timeout_s=60) as one, OAVMClient(service, timeout_s=60) as two:
        assert_same(one.open_clip("A", 0, a.frames[0], {"hero": a.masks[0]["hero"]}),
                    ref_a.step(a.frames[0], {"hero": a.masks[0]["hero"]}))
        first_b = {k: b.masks[0][k] for k in ("left", "right")}
        assert_same(two.open_clip("B", 10, b16[0], first_b, downsample_ratio=0.5), ref_b.step(b16[0], first_b))
        result = one.open_clip("C", 5, c8[0][..., ::-1], {"hero": c.masks[0]["hero"]}, direction=-1,
                               want_foreground=True, channels="BGR")
        assert_same(result, ref_c.step(c8[0], {"hero": c.masks[0]["hero"]}))
        assert (result.clip_id, result.frame_index, result.info["next_frame"]) == ("C", 5, 4)
        for t in (1, 2, 3):
            if t == 2:
                assert_same(one.reprompt("A", t, a.frames[t], "hero", a.masks[t]["hero"]),
                            ref_a.reprompt("hero", a.frames[t], a.masks[t]["hero"]))
            else:
                assert_same(one.matte("A", t, a.frames[t]), ref_a.step(a.frames[t]))
            if t == 2:
                assert_same(two.add_object("B", 10 + t, b16[t], "late", b.masks[t]["late"]),
                            ref_b.add_object("late", b16[t], b.masks[t]["late"]))
            else:
                if t == 3:
                    two.drop_object("B", "right")
                    ref_b.session.remove_object("right")
                assert_same(two.matte("B", 10 + t, b16[t]), ref_b.step(b16[t]))
            assert_same(one.matte("C", 5 - t, c8[t][..., ::-1], channels="BGR"), ref_c.step(c8[t]))
        held = {clip["clip_id"]: clip for clip in two.status()["clips"]}
        assert held["B"]["objects"] == ["left", "late"] and held["B"]["next_frame"] == 14
        assert held["C"]["next_frame"] == 1 and held["C"]["direction"] == -1
        for clip_id in "ABC":
            one.close_clip(clip_id)


def test_status_reports_device_checkpoint_limits(client: OAVMClient, checkpoint: Path) -> None:
    status = client.status()
    assert status["protocol"] == PROTOCOL_VERSION and status["device"] == "cpu" and status["precision"] == "fp32"
    assert status["cuda_graphs"] is False
    assert Path(status["checkpoint"]["path"]).name == checkpoint.name and len(status["checkpoint"]["sha256"]) == 64
    assert status["loopback"] is True and status["matte_file"] is True
    assert status["limits"]["max_clips"] >= 1 and status["limits"]["max_frame_pixels"] > 0


def test_frames_out_of_order_are_refused_naming_the_expected_one(client: OAVMClient, engine) -> None:
    clip, ref = synthetic_clip(4, 4), ReferenceClip(engine)
    client.open_clip("order", 100, clip.frames[0], clip.masks[0], direction=-1)
    ref.step(clip.frames[0], clip.masks[0])
    for wrong in (98, 100, 101):                          # a gap, a repeat, the wrong direction
        with pytest.raises(OAVMServiceError) as info:
            client.matte("order", wrong, clip.frames[1])
        assert info.value.code == ErrorCode.OUT_OF_ORDER
        assert "expects frame 99 next" in info.value.message and f"not frame {wrong}" in info.value.message
    assert_same(client.matte("order", 99, clip.frames[1]), ref.step(clip.frames[1]))
    with pytest.raises(OAVMServiceError) as info:
        client.open_clip("order", 50, clip.frames[2], clip.masks[2])
    assert info.value.code == ErrorCode.BAD_REQUEST and "restart=true" in info.value.message
    restarted = ReferenceClip(engine)                     # restart: a new clip at any frame
    assert_same(client.open_clip("order", 50, clip.frames[2], clip.masks[2], restart=True),
                restarted.step(clip.frames[2], clip.masks[2]))
    assert_same(client.matte("order", 51, clip.frames[3]), restarted.step(clip.frames[3]))
    client.close_clip("order")
    client.close_clip("order")                            # closing twice is harmless
    with pytest.raises(OAVMServiceError) as info:
        client.matte("order", 52, clip.frames[3])
    assert info.value.code == ErrorCode.UNKNOWN_CLIP and "open_clip" in info.value.message


def _bad_requests(clip_id: str, next_frame: int, frame: np.ndarray) -> list[tuple[str, list, str, str]]:
    """(what, raw multipart, expected code, words the message must contain)."""
    good = {"v": PROTOCOL_VERSION, "op": "matte", "id": "raw-1", "clip": clip_id, "frame": next_frame, "args": {}}
    desc = {"name": "frame", "dtype": "float32", "shape": [H, W, 3], "channels": "RGB"}
    pixels = frame.astype(np.float32).tobytes()
    nan = frame.copy()
    nan[3, 4, 1] = np.nan

    def enc(header: dict, *buffers: Buffer) -> list:
        return encode_message(header, list(buffers))

    return [
        ("truncated multipart", [msgpack.packb({**good, "buffers": [desc]})], ErrorCode.BAD_REQUEST,
         "describes 1 buffer(s) but 0 part(s)"),
        ("non-msgpack header", [b"\x93not really", pixels], ErrorCode.BAD_REQUEST, "not a msgpack header"),
        ("empty part", [b""], ErrorCode.BAD_REQUEST, "msgpack"),
        ("wrong buffer length", [msgpack.packb({**good, "buffers": [desc]}), pixels[:-4]], ErrorCode.BAD_REQUEST,
         "bytes arrived"),
        ("unknown op", [msgpack.packb({**good, "op": "teleport"})], ErrorCode.BAD_REQUEST, "unknown op"),
        ("other protocol version", [msgpack.packb({**good, "v": 2, "buffers": [desc]}), pixels],
         ErrorCode.VERSION_MISMATCH, "matching versions"),
        ("absurd declared size", [msgpack.packb({**good, "buffers": [{**desc, "shape": [100000, 100000, 3]}]}),
                                  pixels], ErrorCode.TOO_LARGE, "100000x100000"),
        ("unknown clip", enc({**good, "clip": "never-opened"}, Buffer("frame", frame)), ErrorCode.UNKNOWN_CLIP,
         "open_clip"),
        ("NaN pixels", enc(good, Buffer("frame", nan)), ErrorCode.BAD_INPUT, "NaN"),
        ("frame of another size", enc(good, Buffer("frame", frame[:32])), ErrorCode.BAD_INPUT, "64"),
        ("two-channel frame", enc(good, Buffer("frame", frame[..., :2], "RG")), ErrorCode.BAD_INPUT, "R, G and B"),
        ("no frame buffer", enc(good), ErrorCode.BAD_REQUEST, "needs a 'frame' buffer"),
        ("mistyped argument", enc({**good, "op": "open_clip", "clip": "x", "args": {"direction": "up"}}),
         ErrorCode.BAD_REQUEST, "'direction'"),
        ("prompt without masks", enc({**good, "op": "prompt"}, Buffer("frame", frame)), ErrorCode.BAD_REQUEST,
         "one 'mask' buffer per object"),
        ("reprompt of an unknown object", enc({**good, "op": "reprompt", "args": {"object": "ghost"}},
                                              Buffer("frame", frame), Buffer("mask", frame[..., 0], "A", "ghost")),
         ErrorCode.BAD_INPUT, "ghost"),
    ]


def test_prompt_keys_several_objects_at_one_frame_like_the_engine(client: OAVMClient, engine) -> None:
    """A keyframe of a crowd shot: the known object corrected and a new one added in one step, as the engine's
    ``step(frame, prompts)`` does; the clip goes on with both."""
    assert "prompt" in client.status()["ops"]          # what a client checks before relying on it
    clip, ref = synthetic_clip(6, 4, ("left", "right", "late")), ReferenceClip(engine)
    first = {k: clip.masks[0][k] for k in ("left", "right")}
    assert_same(client.open_clip("crowd", 0, clip.frames[0], first), ref.step(clip.frames[0], first))
    keyed = {"left": clip.masks[1]["left"], "late": clip.masks[1]["late"]}
    result = client.prompt("crowd", 1, clip.frames[1], keyed)
    assert_same(result, ref.step(clip.frames[1], keyed))
    assert result.info["objects"] == ["left", "right", "late"]
    assert_same(client.matte("crowd", 2, clip.frames[2]), ref.step(clip.frames[2]))
    with pytest.raises(OAVMServiceError, match="at least one object mask"):
        client.prompt("crowd", 3, clip.frames[3], {})
    assert_same(client.prompt("crowd", 3, clip.frames[3], {"right": clip.masks[3]["right"]}),
                ref.step(clip.frames[3], {"right": clip.masks[3]["right"]}))
    client.close_clip("crowd")


def test_every_bad_input_gets_an_error_and_the_next_good_request_is_answered(service: str, client: OAVMClient,
                                                                             engine) -> None:
    clip, ref = synthetic_clip(5, 2), ReferenceClip(engine)
    assert_same(client.open_clip("victim", 0, clip.frames[0], clip.masks[0]),
                ref.step(clip.frames[0], clip.masks[0]))
    for what, parts, code, words in _bad_requests("victim", 1, clip.frames[1]):
        reply = raw_request(service, parts)
        assert reply.header["ok"] is False, what
        assert reply.header["error"]["code"] == code, (what, reply.header["error"])
        assert words in reply.header["error"]["message"], (what, reply.header["error"]["message"])
        assert client.status()["protocol"] == PROTOCOL_VERSION, what
    # none of them advanced or damaged the clip: frame 1 is still the next one, with the same matte
    assert_same(client.matte("victim", 1, clip.frames[1]), ref.step(clip.frames[1]))
    client.close_clip("victim")


def test_error_reply_echoes_the_request_id(service: str) -> None:
    header = request_header("matte", "my-id-77", clip="nobody", frame=0)
    reply = raw_request(service, encode_message(header, [Buffer("frame", np.zeros((4, 4, 3), np.float32))]))
    assert reply.request_id == "my-id-77" and reply.header["error"]["code"] == ErrorCode.UNKNOWN_CLIP


def test_a_req_socket_works_too(service: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(service)
        sock.send_multipart(encode_message(request_header("status", 1)))
        assert sock.poll(30_000)
        reply = decode_message(sock.recv_multipart(), request=False)
        assert reply.header["ok"] and reply.header["result"]["protocol"] == PROTOCOL_VERSION
    finally:
        sock.close(0)
        ctx.term()


def test_save_and_load_continue_a_clip_bit_identically(client: OAVMClient, tmp_path: Path) -> None:
    clip = synthetic_clip(6, 4, ("a", "b"))
    client.open_clip("farm-1", 0, clip.frames[0], clip.masks[0])
    client.matte("farm-1", 1, clip.frames[1])
    path = client.save_clip("farm-1", tmp_path / "chunk1.oavmclip")
    assert Path(path).is_file()
    later = [client.matte("farm-1", t, clip.frames[t]) for t in (2, 3)]
    info = client.load_clip("farm-2", path)        # the next chunk, under its own clip id
    assert info["next_frame"] == 2 and info["objects"] == ["a", "b"] and info["frames_seen"] == 2
    for t, expected in zip((2, 3), later):
        result = client.matte("farm-2", t, clip.frames[t])
        assert_same(result, {obj: dict(layers) for obj, layers in expected.layers.items()})
    default = Path(client.save_clip("farm-2"))     # no path: the service's state directory
    assert default.is_file() and default.suffix == ".oavmclip"
    client.close_clip("farm-2")
    assert not default.exists()                    # closing forgets the saved state too
    with pytest.raises(OAVMServiceError) as info:
        client.load_clip("farm-3", tmp_path / "missing.oavmclip")
    assert info.value.code == ErrorCode.BAD_INPUT and "save_clip" in info.value.message
    (tmp_path / "junk.oavmclip").write_bytes(b"not a state")
    with pytest.raises(OAVMServiceError) as info:
        client.load_clip("farm-3", tmp_path / "junk.oavmclip")
    assert info.value.code == ErrorCode.BAD_INPUT and "open_clip" in info.value.message
    client.close_clip("farm-1")


def test_matte_file_reads_the_plate_itself(client: OAVMClient, engine, tmp_path: Path) -> None:
    from oavm_service.io.colour import InputColorspace, to_network_rgb
    from oavm_service.io.images import read_image, write_image

    clip = synthetic_clip(7, 2)
    plate = tmp_path / "plate.0001.exr"
    write_image(plate, clip.frames[1] ** 2.2, ["R", "G", "B"])      # a linear float plate
    network_rgb = to_network_rgb(read_image(plate).rgb(), InputColorspace.LINEAR)
    ref = ReferenceClip(engine)
    client.open_clip("file", 0, clip.frames[0], clip.masks[0])
    ref.step(clip.frames[0], clip.masks[0])
    assert_same(client.matte_file("file", 1, plate), ref.step(network_rgb))
    with pytest.raises(OAVMServiceError) as info:
        client.matte_file("file", 2, tmp_path / "nothing.exr")
    assert info.value.code == ErrorCode.BAD_INPUT and "does not exist" in info.value.message
    client.close_clip("file")


def test_a_resent_request_is_answered_again_without_advancing_the_clip(service: str, client: OAVMClient,
                                                                       engine) -> None:
    clip, ref = synthetic_clip(8, 3), ReferenceClip(engine)
    client.open_clip("resend", 0, clip.frames[0], clip.masks[0])
    ref.step(clip.frames[0], clip.masks[0])
    request = encode_message(request_header("matte", "lost-reply-1", clip="resend", frame=1),
                             [Buffer("frame", clip.frames[1])])
    first, again = raw_request(service, request), raw_request(service, request)   # what a Lazy Pirate retry does
    expected = ref.step(clip.frames[1])
    for reply in (first, again):
        assert reply.header["ok"] and reply.request_id == "lost-reply-1"
        np.testing.assert_array_equal(reply.buffers[0].array, expected["hero"]["alpha"])
    assert_same(client.matte("resend", 2, clip.frames[2]), ref.step(clip.frames[2]))
    client.close_clip("resend")


def test_a_service_beyond_loopback_reads_no_files_and_writes_states_only_in_its_state_dir(engine,
                                                                                        tmp_path: Path) -> None:
    """The Service behind the socket, in this process, configured for a public endpoint (nothing is bound)."""
    from oavm_service.server import ServeConfig, Service

    service = Service(engine, ServeConfig(endpoint="tcp://192.0.2.10:5590", state_dir=tmp_path / "state"))
    clip = synthetic_clip(9, 2)

    def ask(op: str, buffers=(), **args) -> Message:
        header = request_header(op, f"r-{op}", clip="remote", frame=args.pop("frame", None), **args)
        return decode_message(service.handle(encode_message(header, list(buffers)))[0], request=False)

    opened = ask("open_clip", [Buffer("frame", clip.frames[0]), Buffer("mask", clip.masks[0]["hero"], "A", "hero")],
                 frame=0)
    assert opened.header["ok"]
    refused = ask("matte_file", frame=1, path=str(tmp_path / "plate.exr"))
    assert refused.header["error"]["code"] == ErrorCode.BAD_REQUEST
    assert "beyond loopback" in refused.header["error"]["message"]
    outside = ask("save_clip", path=str(tmp_path / "elsewhere.oavmclip"))
    assert outside.header["error"]["code"] == ErrorCode.BAD_REQUEST and not (tmp_path / "elsewhere.oavmclip").exists()
    inside = ask("save_clip", path=str(tmp_path / "state" / "kept.oavmclip"))
    assert inside.header["ok"] and (tmp_path / "state" / "kept.oavmclip").is_file()
    assert ask("status").header["result"]["matte_file"] is False


def test_a_stream_keeps_the_next_frame_in_flight_and_matches_the_engine(client: OAVMClient, engine) -> None:
    clip, ref = synthetic_clip(11, 7), ReferenceClip(engine)
    client.open_clip("stream", 0, clip.frames[0], clip.masks[0])
    ref.step(clip.frames[0], clip.masks[0])
    pulled: list[int] = []

    def frames():
        for t in range(1, 7):
            pulled.append(t)
            yield clip.frames[t]

    for t, result in enumerate(client.matte_stream("stream", 1, frames()), start=1):
        # when frame t comes back, frame t + 1 is already at the service (two in flight), and t + 2 on its way
        assert pulled[-1] == min(t + 2, 6)
        assert result.frame_index == t and result.info["next_frame"] == t + 1
        assert_same(result, ref.step(clip.frames[t]))
    with pytest.raises(OAVMServiceError, match="in_flight"):
        next(client.matte_stream("stream", 7, [clip.frames[0]], in_flight=3))
    client.close_clip("stream")


def test_an_error_in_a_stream_raises_at_its_frame_and_the_clip_goes_on(client: OAVMClient, engine) -> None:
    clip, ref = synthetic_clip(12, 5), ReferenceClip(engine)
    client.open_clip("stream-bad", 0, clip.frames[0], clip.masks[0])
    ref.step(clip.frames[0], clip.masks[0])
    bad = clip.frames[2].copy()
    bad[3, 4] = np.nan
    got = []
    with pytest.raises(OAVMServiceError) as info:
        for result in client.matte_stream("stream-bad", 1, [clip.frames[1], bad, clip.frames[3]]):
            got.append(result.frame_index)
    assert got == [1] and info.value.code == ErrorCode.BAD_INPUT and "NaN" in info.value.message
    ref.step(clip.frames[1])               # frame 1 was matted; the bad frame 2 and the frame sent after it were not
    assert_same(client.matte("stream-bad", 2, clip.frames[2]), ref.step(clip.frames[2]))
    client.close_clip("stream-bad")


def test_the_last_two_replies_are_answered_again_for_a_streams_resend(service: str, engine) -> None:
    """A streaming client that lost its socket resends both unanswered requests: both come from the cache."""
    clip, ref = synthetic_clip(13, 4), ReferenceClip(engine)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(service)
        masks = [Buffer("mask", clip.masks[0]["hero"], object="hero")]
        sock.send_multipart(encode_message(request_header("open_clip", "s-0", clip="two", frame=0),
                                           [Buffer("frame", clip.frames[0]), *masks]))
        requests = [encode_message(request_header("matte", f"s-{t}", clip="two", frame=t),
                                   [Buffer("frame", clip.frames[t])]) for t in (1, 2)]
        for parts in requests:                   # two in flight
            sock.send_multipart(parts)
        for parts in requests:                   # ... and both sent again before any reply was read
            sock.send_multipart(parts)
        replies = []
        for _ in range(5):
            assert sock.poll(60_000), "the service did not answer"
            replies.append(decode_message(sock.recv_multipart(copy=False), request=False))
    finally:
        sock.close(0)
        ctx.term()
    assert [r.request_id for r in replies] == ["s-0", "s-1", "s-2", "s-1", "s-2"]
    assert all(r.header["ok"] for r in replies)
    ref.step(clip.frames[0], clip.masks[0])
    for t, first, again in ((1, replies[1], replies[3]), (2, replies[2], replies[4])):
        expected = ref.step(clip.frames[t])["hero"]["alpha"]
        np.testing.assert_array_equal(first.buffers[0].array, expected)
        np.testing.assert_array_equal(again.buffers[0].array, expected)
    assert replies[4].header["result"]["next_frame"] == 3          # the resends did not advance the clip


def test_float16_replies_are_the_engines_mattes_in_half_floats(client: OAVMClient, engine, tmp_path: Path,
                                                               service: str) -> None:
    clip, ref = synthetic_clip(14, 4), ReferenceClip(engine, want_foreground=True)
    first = client.open_clip("half", 0, clip.frames[0], clip.masks[0], reply_dtype="float16", want_foreground=True)
    expected = ref.step(clip.frames[0], clip.masks[0])

    def check(result: MatteResult, expected: dict) -> None:
        for name, array in expected["hero"].items():
            got = result.layers["hero"][name]
            assert got.dtype == np.float16 and got.shape == array.shape, name
            np.testing.assert_allclose(got, array, atol=1e-3, err_msg=name)   # half-float rounding only

    check(first, expected)
    check(client.matte("half", 1, clip.frames[1]), ref.step(clip.frames[1]))
    path = client.save_clip("half", tmp_path / "half.oavmclip")
    client.load_clip("half-2", path)                       # a restored clip keeps its reply dtype
    check(client.matte("half-2", 2, clip.frames[2]), ref.step(clip.frames[2]))
    for c in ("half", "half-2"):
        client.close_clip(c)

    with pytest.raises(OAVMServiceError, match="reply_dtype"):
        client.open_clip("half-bad", 0, clip.frames[0], clip.masks[0], reply_dtype="uint8")
    reply = raw_request(service, encode_message(
        request_header("open_clip", "bad-dtype", clip="half-bad", frame=0, reply_dtype="int8"),
        [Buffer("frame", clip.frames[0]), Buffer("mask", clip.masks[0]["hero"], object="hero")]))
    assert not reply.header["ok"] and reply.header["error"]["code"] == ErrorCode.BAD_REQUEST
    assert "float16" in reply.header["error"]["message"]


class LossyProxy:
    """A loopback hop between one client and the service that loses chosen replies (the service never knows).

    What a stream must survive: a reply that does not come back. The client times out, opens a new socket and sends
    its unanswered requests again; the service answers those it had done from its reply cache."""

    def __init__(self, service: str, drop_replies: set[int]):
        import threading

        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.connect(service)
        self.drop, self.replies, self.requests = set(drop_replies), 0, 0
        self.request_bytes: list[int] = []        # of each request as it crossed the socket
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        client = None
        while self.running:
            events = dict(poller.poll(50))
            if self.front in events:
                client, *body = self.front.recv_multipart()      # the newest socket of the client answers
                self.requests += 1
                self.request_bytes.append(sum(len(part) for part in body))
                self.back.send_multipart(body)
            if self.back in events:
                reply = self.back.recv_multipart()
                self.replies += 1
                if self.replies not in self.drop and client is not None:
                    self.front.send_multipart([client, *reply])

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.front.close(0)
        self.back.close(0)
        self.ctx.term()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "in-messages"])
def test_a_stream_that_loses_a_reply_sends_both_frames_again_and_gets_the_same_mattes(service: str, engine,
                                                                                      shared_memory: bool) -> None:
    clip, ref = synthetic_clip(15, 5), ReferenceClip(engine)
    # requests: (the shared-memory probe,) open_clip, status (the stream's limits), frame 1: its reply is lost
    before = 3 if shared_memory else 2
    proxy = LossyProxy(service, drop_replies={before + 1})
    try:
        with OAVMClient(proxy.endpoint, timeout_s=2, retries=2, shared_memory=shared_memory) as client:
            client.open_clip("lossy", 0, clip.frames[0], clip.masks[0])
            ref.step(clip.frames[0], clip.masks[0])
            results = list(client.matte_stream("lossy", 1, clip.frames[1:]))
            assert [r.frame_index for r in results] == [1, 2, 3, 4]
            for t, result in enumerate(results, start=1):
                assert_same(result, ref.step(clip.frames[t]))       # each frame matted once, in order
            # frames 1 and 2 went twice (the second time from the reply cache), 3 and 4 once
            assert proxy.requests == before + 4 + 2
            assert client.shm_verdict == "ok" if shared_memory else client.shm_verdict.startswith("not used")
            client.close_clip("lossy")
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------------ shared memory
def _own_segments() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"oavm-shm-{os.getpid()}-")]


def test_frames_go_through_shared_memory_with_the_same_mattes_and_leave_no_file(service: str, engine) -> None:
    clip = synthetic_clip(21, 6)
    proxy = LossyProxy(service, drop_replies=set())     # drops nothing: it measures what crosses the socket
    runs = {}
    try:
        for shared in (True, False):
            with OAVMClient(proxy.endpoint, timeout_s=60, shared_memory=shared) as client:
                first = len(proxy.request_bytes)
                clip_id = f"shm-{shared}"
                results = [client.open_clip(clip_id, 0, clip.frames[0], clip.masks[0])]
                results += [client.matte(clip_id, t, clip.frames[t]) for t in (1, 2)]
                results += list(client.matte_stream(clip_id, 3, clip.frames[3:]))
                status = client.status()["shared_memory"]
                client.close_clip(clip_id)
                runs[shared] = results, client.shm_verdict, proxy.request_bytes[first:], status
                if shared:
                    assert len(_own_segments()) == 1
            assert not _own_segments()                  # closing the client removed its segment
    finally:
        proxy.close()
    ref = ReferenceClip(engine)
    for t, (in_memory, in_messages) in enumerate(zip(runs[True][0], runs[False][0])):
        expected = ref.step(clip.frames[t], clip.masks[0] if t == 0 else None)
        assert_same(in_memory, expected)
        assert_same(in_messages, expected)
    assert runs[True][1] == "ok" and runs[False][1] == "not used: turned off (shared_memory=False)"
    assert runs[True][3]["enabled"] and runs[True][3]["segments"] >= 1
    frame_bytes = clip.frames[0].nbytes
    assert max(runs[True][2]) < 1024 <= frame_bytes          # headers only: the pixels did not cross the socket
    assert sorted(runs[False][2])[-6:][0] >= frame_bytes      # six requests carried a frame each


def test_shared_memory_is_refused_clearly_for_a_file_that_is_not_a_clients_segment(service: str,
                                                                                   tmp_path: Path) -> None:
    frame = np.zeros((H, W, 3), np.float32)
    described = [dict(Buffer("frame", frame, "RGB").describe(), at=64)]

    def request(shm: dict) -> Message:
        head = {**request_header("matte", "shm-1", clip="nope", frame=0), "v": PROTOCOL_VERSION,
                "buffers": described, "shm": shm}
        return raw_request(service, [msgpack.packb(head)])

    plain = tmp_path / "plain.bin"
    plain.write_bytes(bytes(frame.nbytes + 64))
    cases = [({"path": str(plain), "size": frame.nbytes + 64}, "not a segment this service maps"),
             ({"path": "/dev/shm/oavm-shm-1-0123456789abcdef", "size": frame.nbytes + 64}, "cannot open"),
             ({"path": "/etc/passwd", "size": 10}, "not a segment this service maps"),
             ({"path": 7}, "must be a map {path, size}")]
    for shm, words in cases:
        reply = request(shm)
        assert reply.header["error"]["code"] == ErrorCode.SHARED_MEMORY, shm
        assert words in reply.header["error"]["message"] and "send the pixels as message parts" in \
            reply.header["error"]["message"]
    with OAVMClient(service, timeout_s=30) as client:      # still serving
        assert client.status()["shared_memory"]["enabled"]


def test_a_client_whose_shared_memory_cannot_be_reserved_sends_the_frames_in_the_messages(service: str,
                                                                                          engine) -> None:
    """/dev/shm full (a container's 64 MB, here a 4 KiB file size limit): the segment is refused when it is made, the
    frames go in the messages, and nothing crashes later on a write into memory that is not there."""
    import subprocess
    import sys
    import tempfile

    clip = synthetic_clip(23, 2)
    script = (
        "import resource, signal, sys, numpy as np\n"
        "from shared.client import OAVMClient\n"
        "frames = np.load(sys.argv[2])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "with OAVMClient(sys.argv[1], timeout_s=60) as c:\n"
        "    c.open_clip('full', 0, frames[0], {'hero': frames[2][..., 0]})\n"
        "    r = c.matte('full', 1, frames[1])\n"
        "    c.close_clip('full')\n"
        "print(c.shm_verdict)\n"
        "print(r.layers['hero']['alpha'].tobytes().hex())\n")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/in.npy", np.stack([clip.frames[0], clip.frames[1],
                                           np.repeat(clip.masks[0]["hero"][..., None], 3, -1)]))
        done = subprocess.run([sys.executable, "-c", script, service, f"{tmp}/in.npy"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0, done.stderr
    verdict, alpha = done.stdout.splitlines()
    assert verdict.startswith("not used: cannot reserve") and "--shm-size" in verdict, verdict
    ref = ReferenceClip(engine)
    ref.step(clip.frames[0], clip.masks[0])
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(alpha), np.float32).reshape(H, W),
                                  ref.step(clip.frames[1])["hero"]["alpha"])


def test_a_service_restarted_without_shared_memory_gets_the_next_frame_in_the_message(
        tmp_path: Path, checkpoint: Path, engine) -> None:
    """The client probed a service that read its segment; the service that answers now does not: the refused frame
    is sent again in the message, and the clip goes on as if nothing had happened."""
    from tests.helpers.live_service import free_port

    clip, ref = synthetic_clip(25, 3), ReferenceClip(engine)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with OAVMClient(endpoint, timeout_s=60) as client:
        with live_service(tmp_path, checkpoint=checkpoint, endpoint=endpoint):
            assert_same(client.open_clip("restart", 0, clip.frames[0], clip.masks[0]),
                        ref.step(clip.frames[0], clip.masks[0]))
            assert_same(client.matte("restart", 1, clip.frames[1]), ref.step(clip.frames[1]))
            assert client.shm_verdict == "ok"
        # stopped: the clip was saved to the state directory, where the next service finds it
        with live_service(tmp_path, checkpoint=checkpoint, endpoint=endpoint, extra_args=["--no-shared-memory"]):
            assert_same(client.matte("restart", 2, clip.frames[2]), ref.step(clip.frames[2]))
            assert client.shm_verdict.startswith("not used: ") and "--no-shared-memory" in client.shm_verdict
            assert client.status()["shared_memory"] == {"enabled": False, "segments": 0}
            log = (tmp_path / "service.log").read_text()
            assert "matte clip=restart frame=2 -> shared_memory" in log and "frame=2 -> ok" in log
