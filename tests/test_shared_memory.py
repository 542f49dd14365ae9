# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared memory between a client and the service, without the service: real segments (files mapped by this
process) through the real encoder and decoder; what the service refuses to map, and why; who removes the files."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from shared.protocol import Buffer, ErrorCode, ProtocolError, Region, decode_message, encode_message, request_header
from shared.shared_memory import ALIGN, PREFIX, Segment, SegmentMap, SharedMemoryError, sweep_stale


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def _buffers(seed: int = 0) -> list[Buffer]:
    rng = np.random.default_rng(seed)
    frame = rng.random((9, 13, 3)).astype(np.float32)
    mask = (rng.random((9, 13)) > 0.5).astype(np.uint8) * 255
    return [Buffer("frame", frame, "RGB"), Buffer("mask", mask, "A", "hero")]


def _header() -> dict:
    return request_header("open_clip", "c-1", clip="shot", frame=0)


def _whole(segment: Segment) -> Region:
    return Region(segment.path, segment.memory, ALIGN, segment.size - ALIGN)


def test_a_request_in_shared_memory_is_one_header_part_and_decodes_to_the_same_read_only_arrays(folder: Path) -> None:
    buffers = _buffers()
    segment = Segment(4096, str(folder))
    try:
        parts = encode_message(_header(), buffers, region=_whole(segment))
        assert len(parts) == 1                               # the pixels did not go in the message
        msg = decode_message(parts, shared_memory=SegmentMap(str(folder), 1 << 20).memory)
        for sent, got in zip(buffers, msg.buffers):
            assert (got.name, got.channels, got.object) == (sent.name, sent.channels, sent.object)
            np.testing.assert_array_equal(got.array, sent.array)
            assert not got.array.flags.writeable             # the service maps clients' memory read-only
        assert msg.header["shm"] == segment.ref
        assert all(d["at"] % ALIGN == 0 for d in msgpack.unpackb(parts[0])["buffers"])   # each on a cache line
    finally:
        segment.close()


def test_what_does_not_fit_in_the_region_goes_as_parts_and_both_decode(folder: Path) -> None:
    buffers = _buffers(1)
    segment = Segment(4096, str(folder))
    try:
        frame_only = Region(segment.path, segment.memory, ALIGN, buffers[0].array.nbytes)
        parts = encode_message(_header(), buffers, region=frame_only)
        assert len(parts) == 2                               # the mask did not fit: it is the one part
        msg = decode_message(parts, shared_memory=SegmentMap(str(folder), 1 << 20).memory)
        for sent, got in zip(buffers, msg.buffers):
            np.testing.assert_array_equal(got.array, sent.array)
    finally:
        segment.close()


def test_messages_that_misuse_shared_memory_are_refused_with_a_code_and_advice(folder: Path) -> None:
    segment = Segment(4096, str(folder))
    mapper = SegmentMap(str(folder), 1 << 20)
    try:
        parts = encode_message(_header(), _buffers(), region=_whole(segment))
        with pytest.raises(ProtocolError) as info:           # a side that takes no shared memory
            decode_message(parts)
        assert info.value.code == ErrorCode.SHARED_MEMORY and "send the pixels as message parts" in info.value.message

        head = msgpack.unpackb(parts[0])
        no_segment = {k: v for k, v in head.items() if k != "shm"}
        with pytest.raises(ProtocolError, match="names no shared-memory segment") as info:
            decode_message([msgpack.packb(no_segment)], shared_memory=mapper.memory)
        assert info.value.code == ErrorCode.BAD_REQUEST
        beyond = dict(head, buffers=[dict(head["buffers"][0], at=4000), head["buffers"][1]])
        with pytest.raises(ProtocolError, match="of a 4096-byte segment") as info:
            decode_message([msgpack.packb(beyond)], shared_memory=mapper.memory)
        assert info.value.code == ErrorCode.BAD_REQUEST
        negative = dict(head, buffers=[dict(head["buffers"][0], at=-64), head["buffers"][1]])
        with pytest.raises(ProtocolError, match="integer >= 0"):
            decode_message([msgpack.packb(negative)], shared_memory=mapper.memory)
        wrong_size = dict(head, shm={"path": segment.path, "size": 8192})
        with pytest.raises(ProtocolError, match="not a 8192-byte regular file") as info:
            decode_message([msgpack.packb(wrong_size)], shared_memory=mapper.memory)
        assert info.value.code == ErrorCode.SHARED_MEMORY
    finally:
        segment.close()


def test_the_service_maps_only_its_users_segments_in_its_folder(folder: Path, tmp_path_factory) -> None:
    mapper = SegmentMap(str(folder), max_segment_bytes=8192)
    segment = Segment(4096, str(folder))
    other = tmp_path_factory.mktemp("elsewhere")
    foreign = Segment(4096, str(other))
    plain = folder / "frame.raw"
    plain.write_bytes(bytes(4096))
    link = folder / f"{PREFIX}{os.getpid()}-{'0' * 16}"
    link.symlink_to(segment.path)
    big = Segment(16384, str(folder))
    try:
        assert mapper.memory(segment.ref).nbytes == 4096 and len(mapper) == 1
        cases = [(foreign.ref, "is not a segment this service maps"),
                 ({"path": str(plain), "size": 4096}, "is not a segment this service maps"),
                 ({"path": str(link), "size": 4096}, "cannot open"),              # no links
                 (big.ref, "this service maps at most 8192"),
                 ({"path": segment.path + "0", "size": 4096}, "is not a segment"),
                 ({"path": segment.path}, "must be a map {path, size}"),
                 ("/etc/passwd", "must be a map {path, size}")]
        for ref, words in cases:
            with pytest.raises(SharedMemoryError, match=None) as info:
                mapper.memory(ref)
            assert words in str(info.value), (ref, str(info.value))
        assert mapper.probe({**segment.ref, "token": segment.token.hex()}) == "ok"
        assert "token differs" in mapper.probe({**segment.ref, "token": "00" * 16})
        assert "not a segment" in mapper.probe({**foreign.ref, "token": foreign.token.hex()})
        assert mapper.probe("/etc/passwd") == "'shm_probe' must be a map {path, size, token}"
    finally:
        for s in (segment, foreign, big):
            s.close()


def test_segments_are_private_and_removed_by_close_even_while_an_array_views_them(folder: Path) -> None:
    segment = Segment(4096, str(folder))
    mode = stat.S_IMODE(os.stat(segment.path).st_mode)
    assert mode == 0o600 and os.stat(segment.path).st_size == 4096
    view = np.frombuffer(segment.memory, np.uint8)            # e.g. an array the caller still holds
    segment.close()
    assert not os.path.exists(segment.path)
    assert view[:16].tobytes() == segment.token               # still mapped for as long as it is viewed


def test_a_segment_nobody_closed_is_removed_when_it_is_collected_or_the_process_exits(folder: Path) -> None:
    import gc

    segment = Segment(4096, str(folder))
    path = segment.path
    del segment
    gc.collect()
    assert not os.path.exists(path)                          # a client dropped without close()
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom shared.shared_memory import Segment\n"
                           "kept = Segment(4096, sys.argv[1])\nprint(kept.path)\n", str(folder)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(done.stdout.strip())           # still held at exit: removed then


def test_the_service_forgets_a_mapping_once_its_file_is_gone(folder: Path) -> None:
    mapper = SegmentMap(str(folder), 1 << 20)
    first, second = Segment(4096, str(folder)), Segment(4096, str(folder))
    mapper.memory(first.ref)
    first.close()
    mapper.memory(second.ref)
    assert len(mapper) == 1                                   # the removed one was let go
    second.close()


def test_segments_of_clients_that_died_are_swept_and_live_ones_kept(folder: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = folder / f"{PREFIX}{dead_pid}-{'a' * 16}"
    alive = folder / f"{PREFIX}{os.getppid()}-{'b' * 16}"
    unrelated = folder / "oavm-shm-notes.txt"
    for path in (stale, alive, unrelated):
        path.write_bytes(b"x")
    segment = Segment(4096, str(folder))                      # a new client sweeps as it starts
    try:
        assert not stale.exists() and alive.exists() and unrelated.exists()
        assert sweep_stale(str(folder)) == 0
    finally:
        segment.close()


def test_a_folder_without_room_refuses_the_segment_when_it_is_made(folder: Path) -> None:
    """Pages reserved up front: a full /dev/shm is an error now, not a SIGBUS on a later write."""
    script = ("import resource, signal, sys\n"
              "from shared.shared_memory import Segment, SharedMemoryError\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "try:\n"
              "    Segment(1 << 20, sys.argv[1])\n"
              "except SharedMemoryError as exc:\n"
              "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0, done.stderr
    assert "cannot reserve 1 MiB" in done.stdout and "--shm-size" in done.stdout
    assert not list(folder.iterdir())                          # and no file was left behind


def test_the_services_bound_holds_every_segment_a_client_makes_within_the_limits(folder: Path) -> None:
    """The segment layout the client sizes by and the service bounds by is one set of functions: any request within
    the message limits gets a slot no larger than the service's largest, and its buffers fit in it as placed."""
    from shared.protocol import MAX_IN_FLIGHT, Limits
    from shared.shared_memory import largest_slot, segment_bytes, slot_bytes, slot_offset

    limits = Limits(max_message_bytes=10_000, max_buffers=4)
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, limits.max_buffers + 1))
        cuts = np.sort(rng.integers(0, limits.max_message_bytes + 1, n - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [limits.max_message_bytes]])).tolist()
        assert slot_bytes(sizes) <= largest_slot(limits.max_message_bytes, limits.max_buffers)
    sizes = [1, ALIGN + 1, 3 * ALIGN - 1]
    slot = slot_bytes(sizes)
    segment = Segment(segment_bytes(slot, MAX_IN_FLIGHT), str(folder))
    try:
        for index in range(MAX_IN_FLIGHT):
            region = Region(segment.path, segment.memory, slot_offset(index, slot), slot)
            arrays = [np.full(size, index + 1, np.uint8) for size in sizes]
            parts = encode_message(request_header("matte", "r"), [Buffer(f"b{i}", a) for i, a in enumerate(arrays)],
                                   region=region)
            assert len(parts) == 1                                    # every buffer placed in the slot
            assert slot_offset(index, slot) + slot <= segment.size
    finally:
        segment.close()
