# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared memory between a client and a service on one machine: frames without socket copies.

A 1080p float32 frame is 25 MB; through a loopback socket it is copied into the kernel and out again into a fresh
buffer of the service. Here the client owns a segment: a file in ``/dev/shm`` (memory, not disk) that both processes
map. It writes a request's frame and masks into it (one copy) and says where in the header (``shared.protocol``
describes the fields); the service reads the pixels in place. Replies still travel in the messages: written into
shared memory by the service and copied out by the client they cost as much as they saved (docs/performance.md).

Who may read whose memory: the service maps, read-only, only files in its own shared-memory folder, named as
``Segment`` names them, regular files (no links) owned by its own user, and only when it listens on loopback. The
client creates each segment readable by its owner only and reserves its pages up front (``posix_fallocate``), so a
full ``/dev/shm`` (Docker gives containers 64 MB) is an error at creation, and the client then sends pixels in the
message as before, never a crash on a later write. Segments are removed by the client that made them (``close``,
garbage collection, or exit); those of a client that was killed are removed by the next client that starts.

Linux only (where ``/dev/shm`` is a memory file system); elsewhere ``default_dir`` is None and pixels travel in the
messages. Imports only numpy and the standard library (this runs inside Blender and Nuke).
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Mapping

PREFIX = "oavm-shm-"
NAME = re.compile(r"oavm-shm-(?P<pid>\d+)-[0-9a-f]{16}\Z")
ALIGN = 64                   # every buffer starts on a cache line
TOKEN_BYTES = 16             # the segment's first bytes: a random token that proves the service sees this file


def default_dir() -> str | None:
    """The folder segments go in: ``/dev/shm`` on Linux, else None (no shared memory: pixels go in the messages)."""
    if os.name != "posix" or not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK | os.X_OK):
        return None
    return "/dev/shm"


def aligned(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


# A client's segment: the token's cache line, then one slot per request it may have in flight; a slot holds the
# request's buffers, each from a cache line. The client sizes segments by these, the service bounds them by them.

def slot_bytes(buffer_bytes: Iterable[int]) -> int:
    """The slot for buffers of these sizes: each aligned, and a line to spare."""
    return sum(aligned(n) for n in buffer_bytes) + ALIGN


def largest_slot(max_bytes: int, max_buffers: int) -> int:
    """The largest :func:`slot_bytes` of at most ``max_buffers`` buffers of ``max_bytes`` in all (alignment adds
    less than a line to each)."""
    return int(max_bytes) + ALIGN * (int(max_buffers) + 1)


def segment_bytes(slot: int, slots: int) -> int:
    """A segment of ``slots`` slots of ``slot`` bytes."""
    return ALIGN + int(slots) * int(slot)


def slot_offset(index: int, slot: int) -> int:
    """Where slot ``index`` starts."""
    return ALIGN + int(index) * int(slot)


class SharedMemoryError(Exception):
    """A segment that cannot be made or used; the message says why."""


class Segment:
    """The client's side: one file of ``size`` bytes in ``directory``, mapped; removed by ``close``, or when the
    segment is garbage-collected (a client never closed), or at the interpreter's exit.

    The first TOKEN_BYTES hold a random token (the service's probe reads it back); buffers go after them.
    """

    def __init__(self, size: int, directory: str):
        sweep_stale(directory)
        self.size = max(int(size), ALIGN)
        self.token = os.urandom(TOKEN_BYTES)
        self.path = os.path.join(directory, f"{PREFIX}{os.getpid()}-{os.urandom(8).hex()}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise SharedMemoryError(f"cannot create {self.path} ({exc})") from None
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)   # the pages exist now, or we fail now (not SIGBUS later)
            except (OSError, AttributeError) as exc:   # (AttributeError: a system without posix_fallocate)
                raise SharedMemoryError(f"cannot reserve {self.size / 2**20:.0f} MiB in {directory} ({exc}); "
                                        f"it is probably full or small (a container's /dev/shm is 64 MB unless "
                                        f"started with --shm-size)") from None
            self._map: mmap.mmap | None = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            _unlink(self.path)
            raise
        os.close(fd)
        self._remove = weakref.finalize(self, _unlink, self.path)     # also runs at exit
        self.memory = memoryview(self._map)
        self.memory[:TOKEN_BYTES] = self.token

    def close(self) -> None:
        """Remove the file. The mapping goes when the last array viewing it does; the service keeps its own
        mapping until it notices the file is gone."""
        self._remove()
        try:
            self.memory.release()
            if self._map is not None:
                self._map.close()
        except BufferError:      # an array still views it: it is unmapped when that array goes
            pass
        self._map = None

    @property
    def ref(self) -> dict[str, Any]:
        """How a header names this segment (``shared.protocol``'s ``shm`` field)."""
        return {"path": self.path, "size": self.size}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep_stale(directory: str) -> int:
    """Remove this user's segments whose client process is gone (killed before it could remove them)."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = NAME.match(name)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process
        return True
    return True


class SegmentMap:
    """The service's side: the segments it has mapped, by path, least recently used dropped beyond ``max_segments``.

    ``memory(ref)`` checks that the named file is one a client of this user made for this purpose before mapping it,
    read-only. A mapping stays until its file is gone (checked whenever another segment is mapped) or it is the
    least recently used one too many; arrays still viewing it keep it alive until they go.
    """

    def __init__(self, directory: str, max_segment_bytes: int, max_segments: int = 8):
        self.directory = os.path.realpath(directory)
        self.max_segment_bytes = int(max_segment_bytes)
        self.max_segments = int(max_segments)
        self._maps: OrderedDict[str, tuple[memoryview, tuple[int, int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._maps)

    def memory(self, ref: Any) -> memoryview:
        """The whole segment named by a header's ``shm`` field, mapped read-only."""
        path, size = (ref.get("path"), ref.get("size")) if isinstance(ref, Mapping) else (None, None)
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool):
            raise SharedMemoryError("'shm' must be a map {path, size}")
        cached = self._maps.get(path)
        if cached is not None and cached[0].nbytes == size:
            self._maps.move_to_end(path)
            return cached[0]
        if os.path.dirname(path) != self.directory or not NAME.match(os.path.basename(path)):
            raise SharedMemoryError(f"{path!r} is not a segment this service maps: it maps only {self.directory}/"
                                    f"{PREFIX}PID-HEX files made by shared.shared_memory.Segment")
        if not 0 < size <= self.max_segment_bytes:
            raise SharedMemoryError(f"the segment is {size} bytes; this service maps at most "
                                    f"{self.max_segment_bytes} (its message limit for each request a client may "
                                    f"have in flight)")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise SharedMemoryError(f"cannot open {path} ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
                raise SharedMemoryError(f"{path} is not a {size}-byte regular file of this service's user")
            memory = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
        finally:
            os.close(fd)
        self._forget_gone()
        self._maps[path] = (memory, (st.st_dev, st.st_ino))
        while len(self._maps) > self.max_segments:
            self._maps.popitem(last=False)
        return memory

    def _forget_gone(self) -> None:
        """Drop mappings whose file was removed or replaced (their clients closed them)."""
        for path, (_, identity) in list(self._maps.items()):
            try:
                st = os.lstat(path)
                gone = (st.st_dev, st.st_ino) != identity
            except OSError:
                gone = True
            if gone:
                del self._maps[path]

    def probe(self, probe: Any) -> str:
        """"ok" when the segment a client's ``shm_probe`` {path, size, token} names maps and starts with its token
        (hex), else why not."""
        if not isinstance(probe, Mapping):
            return "'shm_probe' must be a map {path, size, token}"
        try:
            memory = self.memory(probe)
        except SharedMemoryError as exc:
            return str(exc)
        token_hex = probe.get("token")
        if not isinstance(token_hex, str) or bytes(memory[:TOKEN_BYTES]).hex() != token_hex:
            return "the segment's token differs: client and service do not see the same file"
        return "ok"
