# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVMClient: what every plug-in and the farm's ``--connect`` mode use to talk to the OAVM service.

A DEALER socket with request ids and the ZeroMQ guide's "Lazy Pirate" reliability: wait ``timeout_s`` for the
reply, else close the socket, open a fresh one and send again, at most ``retries`` more times, then raise
OAVMServiceUnavailable. Replies that carry an older request id are discarded. The service answers a resent request
from its per-clip reply cache, so a retry never advances a clip twice.

On the service's machine (a loopback endpoint, Linux) frames and masks go through shared memory
(``shared_memory.py``) once a probe has shown that the service reads the client's segment; otherwise, and whenever
the service cannot use it, they travel in the messages, as the mattes always do. ``shm_verdict`` says which and why.

Not thread-safe (ZeroMQ sockets are not): use one client per thread. Imports only numpy, pyzmq, msgpack and the
standard library.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import zmq

from .protocol import (DEFAULT_ENDPOINT, DTYPES, MAX_IN_FLIGHT, REPLY_DTYPES, Buffer, ErrorCode, Limits, Message,
                       OAVMServiceError, OAVMServiceUnavailable, Op, ProtocolError, Region, decode_message,
                       default_channels, encode_message, is_loopback, layers_from_buffers, raise_for_error,
                       request_header, rgb_order, to_mask)
from .shared_memory import Segment, SharedMemoryError, default_dir, segment_bytes, slot_bytes, slot_offset

__all__ = ["DEFAULT_ENDPOINT", "MatteResult", "OAVMClient", "load_curve_keys"]

# replies are trusted to be as large as the frames we sent
_REPLY_LIMITS = Limits(max_frame_pixels=1 << 62, max_message_bytes=1 << 62, max_buffers=1 << 20)
# above this many bytes per request the client first asks the service for its limits (one status call)
_ASK_LIMITS_ABOVE = 16 << 20


@dataclass
class MatteResult:
    """One frame's mattes; the arrays are views of the received message (no copy was made)."""
    clip_id: str
    frame_index: int
    layers: dict[str, dict[str, np.ndarray]]   # obj_id -> {"alpha": (H,W), "fgmask": (H,W)[, "fg": (H,W,3)]}, float32
                                               # or the clip's reply_dtype
    info: dict[str, Any] = field(default_factory=dict)   # the service's notes: next_frame, ms, objects


def load_curve_keys(curve_dir: str | os.PathLike, client_name: str = "client") -> dict[str, Any]:
    """Keyword arguments for OAVMClient from a folder made by ``oavm keygen``.

    ``OAVMClient(endpoint, **load_curve_keys(folder))``: the server's public key and this client's key pair.
    """
    import zmq.auth  # pure Python; imported here so that plain loopback use does not need it

    folder = Path(curve_dir)
    server_public, _ = zmq.auth.load_certificate(folder / "server.key")
    client_public, client_secret = zmq.auth.load_certificate(folder / "clients" / f"{client_name}.key_secret")
    if client_secret is None:
        raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"{folder}/clients/{client_name}.key_secret holds no secret key; "
                                                      f"make the keys again with `oavm keygen {folder}`")
    return {"server_public_key": server_public, "client_keys": (client_public, client_secret)}


class OAVMClient:
    """Talks to one OAVM service; every method sends one request and waits for its reply (``matte_stream``
    keeps two frames in flight).

    ``autostart`` is a command (argv) that starts a local service when none answers (plug-ins pass
    ``[python, "-m", "oavm_service", "serve", ...]``); it is started detached, so it outlives the host's
    operation, and its output goes to ``oavm-service-autostart.log`` in the temp folder. ``autostarted`` is its
    Popen. ``server_public_key`` (and ``client_keys``, a (public, secret) pair) turn on CURVE encryption for a
    service beyond loopback; see load_curve_keys. ``shared_memory=False`` sends frames in the messages even when
    the service is on this machine.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout_s: float = 30.0, retries: int = 3,
                 autostart: list[str] | None = None, server_public_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None, connect_timeout_s: float = 3.0,
                 autostart_wait_s: float = 120.0, shared_memory: bool = True):
        if timeout_s <= 0 or retries < 0 or connect_timeout_s <= 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0 and retries >= 0")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.connect_timeout_s = float(connect_timeout_s)
        self.autostart = list(autostart) if autostart else None
        self.autostart_wait_s = float(autostart_wait_s)
        self.autostarted: subprocess.Popen | None = None
        self._server_public_key = server_public_key
        self._client_keys = client_keys
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._token = os.urandom(4).hex()
        self._counter = 0
        self._answered = False            # has any reply arrived (then autostart is no longer considered)
        self._service_limits: dict[str, int] | None = None
        # shared memory: whether it was asked for, the folder (None: not on this machine or not wanted), the
        # segment, its slots' size, and the verdict of the service's probe ("ok", or why frames go in the messages)
        self.shared_memory = bool(shared_memory)
        self._shm_dir = default_dir() if shared_memory and is_loopback(endpoint) else None
        self._segment: Segment | None = None
        self._slot_bytes = 0
        self.shm_verdict: str | None = (None if self._shm_dir else "not used: " + (
            "turned off (shared_memory=False)" if not shared_memory else
            "the service is not on this machine" if not is_loopback(endpoint) else "no /dev/shm on this system"))

    # ------------------------------------------------------------------------------------------------ ops
    def status(self) -> dict:
        """Device, checkpoint, clips held, memory, limits and protocol version; doubles as a heartbeat."""
        return self._request(Op.STATUS).header.get("result", {})

    def open_clip(self, clip_id: str, frame_index: int, frame: np.ndarray, masks: Mapping[str, np.ndarray], *,
                  direction: int = +1, restart: bool = False, downsample_ratio: float | None = None,
                  want_foreground: bool = False, channels: str | None = None, reply_dtype: str = "float32"
                  ) -> MatteResult:
        """Start clip ``clip_id`` at its keyframe with one mask per object; the next frame is index + direction.

        ``restart=True`` replaces a clip of that id that is already open (e.g. the artist jumped in the timeline).
        ``reply_dtype="float16"`` has the clip's mattes sent as half floats: half the bytes back (a half-float EXR
        matte's precision), for clients whose frames are large and many (farm, bench).
        """
        if reply_dtype not in REPLY_DTYPES:
            raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"reply_dtype is {reply_dtype!r}; use one of "
                                                          f"{', '.join(REPLY_DTYPES)}")
        direction = _direction(direction)
        if downsample_ratio is not None and not 0 < float(downsample_ratio) <= 1:
            raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"downsample_ratio is {downsample_ratio!r}; use a number in "
                                                          f"(0, 1] or None for automatic")
        if not masks:
            raise OAVMServiceError(ErrorCode.BAD_INPUT, "open_clip needs at least one object mask, e.g. "
                                                        "{'actor': mask}")
        frame_buf = _frame_buffer(frame, channels)
        buffers = [frame_buf, *(_mask_buffer(obj, m, frame_buf.array.shape[:2]) for obj, m in masks.items())]
        return self._matte_request(Op.OPEN_CLIP, clip_id, frame_index, buffers, direction=direction,
                                   restart=bool(restart), want_foreground=bool(want_foreground),
                                   reply_dtype=reply_dtype,
                                   downsample_ratio=None if downsample_ratio is None else float(downsample_ratio))

    def matte(self, clip_id: str, frame_index: int, frame: np.ndarray, *, channels: str | None = None
              ) -> MatteResult:
        """Matte the clip's next frame (its index must be the last one + direction)."""
        return self._matte_request(Op.MATTE, clip_id, frame_index, [_frame_buffer(frame, channels)])

    def matte_stream(self, clip_id: str, first_index: int, frames: Iterable[np.ndarray], *, direction: int = +1,
                     in_flight: int = MAX_IN_FLIGHT, channels: str | None = None) -> Iterator[MatteResult]:
        """Matte consecutive frames of an open clip (``first_index``, then + ``direction``), yielding each result.

        Up to ``in_flight`` requests wait at the service, so the next frame travels (and the last reply comes back)
        while this one is in the network: on a GPU, where a 1080p float32 frame's transfer takes longer than its
        step, this hides most of the hop. Frames are read from ``frames`` only as they are sent. A silent service
        is handled as in every other call (the unanswered requests are sent again on a fresh socket; the service
        answers what it had done from its reply cache); an error reply raises at its frame, and later frames are
        not matted. Frames already sent are matted even if the caller stops early, so the clip then stands after
        the last frame sent (``status()`` lists each clip's ``next_frame``).
        """
        if not 1 <= in_flight <= MAX_IN_FLIGHT:
            raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"in_flight is {in_flight!r}; use 1 to {MAX_IN_FLIGHT}")
        clip_id, index, direction = _clip_id(clip_id), _frame_index(first_index), _direction(direction)
        source = iter(frames)
        pending: deque[_Pending] = deque()    # in sending order
        sent = 0

        def send_next() -> None:
            nonlocal index, sent
            frame = next(source, None)
            if frame is None:
                return
            buf = _frame_buffer(frame, channels)
            self._check_size(buf.array.nbytes)
            request = _Pending(Op.MATTE, clip_id, index, [buf], {}, slot=sent % in_flight)
            self._encode(request, growable=not pending)
            pending.append(request)
            index += direction
            sent += 1
            if not self._send(request.parts):
                self._resend(pending)

        self._maybe_autostart()
        if self._service_limits is None:     # asked now: a status call later would read the stream's replies
            self._service_limits = dict(self.status().get("limits", {}))
        for _ in range(in_flight):
            send_next()
        while pending:
            reply = self._await_reply(self._socket(), pending[0].request_id, self.timeout_s)
            attempts = 1
            while reply is None:
                if attempts > self.retries:
                    self._retire_segment()   # the service may still read the unanswered frames from it
                    raise OAVMServiceUnavailable(
                        f"no OAVM service answers at {self.endpoint} (op matte of a stream, {_tries(attempts)} of "
                        f"{self.timeout_s:g} s, {pending[0].megabytes:.0f} MiB sent); start it with `oavm serve "
                        f"--endpoint {self.endpoint}`, or check the endpoint and keys in the plug-in settings")
                self._reset_socket()         # a late reply to the old socket must not be read as a newer one's
                self._resend(pending)
                attempts += 1
                reply = self._await_reply(self._socket(), pending[0].request_id, self.timeout_s)
            self._answered = True
            if self._shared_memory_refused(reply, pending[0]):
                for request in pending:      # none of them was matted: all again, in the messages
                    self._encode(request, growable=False)
                self._resend(pending)
                continue
            pending.popleft()
            send_next()                      # before the caller sees this result: keep the service busy
            yield self._matte_result(raise_for_error(reply))

    def matte_file(self, clip_id: str, frame_index: int, path: str | os.PathLike, *, colorspace: str = "auto"
                   ) -> MatteResult:
        """Like matte, but the service reads the still image at ``path`` itself (only a service on loopback does).

        ``colorspace``: "auto" (float files are scene-linear and get the sRGB curve, integer files are used as
        they are), "linear" or "display".
        """
        return self._matte_request(Op.MATTE_FILE, clip_id, frame_index, [], path=os.path.abspath(os.fspath(path)),
                                   colorspace=colorspace)

    def add_object(self, clip_id: str, frame_index: int, frame: np.ndarray, obj_id: str, mask: np.ndarray, *,
                   channels: str | None = None) -> MatteResult:
        """Start matting a new object from the clip's next frame on."""
        return self._prompt(Op.ADD_OBJECT, clip_id, frame_index, frame, obj_id, mask, channels)

    def reprompt(self, clip_id: str, frame_index: int, frame: np.ndarray, obj_id: str, mask: np.ndarray, *,
                 channels: str | None = None) -> MatteResult:
        """Correct a known object with a new mask at the clip's next frame (replaces its long-term memory)."""
        return self._prompt(Op.REPROMPT, clip_id, frame_index, frame, obj_id, mask, channels)

    def prompt(self, clip_id: str, frame_index: int, frame: np.ndarray, masks: Mapping[str, np.ndarray], *,
               channels: str | None = None) -> MatteResult:
        """Masks for several objects at the clip's next frame, in one step: each known object is corrected (as
        ``reprompt``), each new one added (as ``add_object``) - a keyframe of a crowd shot. A service older than this
        op answers ``bad_request`` (unknown op); one object at a time works with every service."""
        if not masks:
            raise OAVMServiceError(ErrorCode.BAD_INPUT, "prompt needs at least one object mask, e.g. {'actor': mask}")
        frame_buf = _frame_buffer(frame, channels)
        buffers = [frame_buf, *(_mask_buffer(obj, m, frame_buf.array.shape[:2]) for obj, m in masks.items())]
        return self._matte_request(Op.PROMPT, clip_id, frame_index, buffers)

    def drop_object(self, clip_id: str, obj_id: str) -> None:
        self._request(Op.DROP_OBJECT, clip=_clip_id(clip_id), object=_object_id(obj_id))

    def save_clip(self, clip_id: str, path: str | os.PathLike | None = None) -> str:
        """Save the clip's state (so another farm chunk can continue it); returns the file's path on the service's
        machine. Without ``path`` it goes to the service's state directory."""
        path = None if path is None else os.path.abspath(os.fspath(path))
        return self._request(Op.SAVE_CLIP, clip=_clip_id(clip_id), path=path).header["result"]["path"]

    def load_clip(self, clip_id: str, path: str | os.PathLike) -> dict:
        """Continue a saved clip under ``clip_id``; returns its objects and the frame it expects next."""
        path = os.path.abspath(os.fspath(path))
        return self._request(Op.LOAD_CLIP, clip=_clip_id(clip_id), path=path).header["result"]

    def close_clip(self, clip_id: str) -> None:
        """Forget the clip (also its saved state in the service's state directory); closing twice is harmless."""
        self._request(Op.CLOSE_CLIP, clip=_clip_id(clip_id))

    def close(self) -> None:
        """Close the socket and remove the shared-memory segment. An autostarted service keeps running for the next
        client."""
        self._reset_socket()
        self._retire_segment()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> "OAVMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ helpers
    def _prompt(self, op: str, clip_id: str, frame_index: int, frame: np.ndarray, obj_id: str, mask: np.ndarray,
                channels: str | None) -> MatteResult:
        frame_buf = _frame_buffer(frame, channels)
        mask_buf = _mask_buffer(_object_id(obj_id), mask, frame_buf.array.shape[:2])
        return self._matte_request(op, clip_id, frame_index, [frame_buf, mask_buf], object=obj_id)

    def _matte_request(self, op: str, clip_id: str, frame_index: int, buffers: Sequence[Buffer], **args: Any
                       ) -> MatteResult:
        reply = self._request(op, clip=_clip_id(clip_id), frame=_frame_index(frame_index), buffers=buffers, **args)
        return self._matte_result(reply)

    def _matte_result(self, reply: Message) -> MatteResult:
        return MatteResult(reply.clip, reply.frame, layers_from_buffers(reply.buffers),
                           dict(reply.header.get("result") or {}))

    def _request(self, op: str, *, clip: str | None = None, frame: int | None = None,
                 buffers: Sequence[Buffer] = (), **args: Any) -> Message:
        self._maybe_autostart()
        self._check_size(sum(b.array.nbytes for b in buffers))
        request = _Pending(op, clip, frame, list(buffers), args)
        while True:
            self._encode(request, growable=True)
            reply = self._exchange(request.parts, request.request_id, attempts=1 + self.retries,
                                   timeout_s=self.timeout_s)
            if reply is None:
                self._retire_segment()       # the service may still read this request's pixels from it
                raise OAVMServiceUnavailable(
                    f"no OAVM service answers at {self.endpoint} (op {op}, {_tries(1 + self.retries)} of "
                    f"{self.timeout_s:g} s{f', {request.megabytes:.0f} MiB sent' if request.megabytes >= 1 else ''});"
                    f" start it with `oavm serve --endpoint {self.endpoint}`, or check the endpoint and keys in the "
                    f"plug-in settings")
            if not self._shared_memory_refused(reply, request):
                return raise_for_error(reply)

    # ------------------------------------------------------------------------------------------ shared memory
    def _encode(self, request: "_Pending", *, growable: bool) -> None:
        """Give ``request`` a fresh id and its parts: pixels in its slot of the shared-memory segment when the
        service can use it, else in the message. ``growable``: no request is in flight, so the segment may be
        replaced by a larger one."""
        request.request_id = self._next_id()
        header = request_header(request.op, request.request_id, clip=request.clip, frame=request.frame,
                                **request.args)
        region = self._slot(request, growable) if request.buffers else None
        request.parts = encode_message(header, request.buffers, region=region)
        request.shared = region is not None

    def _slot(self, request: "_Pending", growable: bool) -> Region | None:
        """Where in the segment (slot ``request.slot``) the request's buffers go, or None when they travel in the
        message (no shared memory here, or the slot is too small and a request is in flight)."""
        if self._shm_dir is None or self.shm_verdict not in (None, "ok"):
            return None
        needed = slot_bytes(b.array.nbytes for b in request.buffers)
        if needed > self._slot_bytes:
            if not growable:
                return None
            self._retire_segment()
            try:
                self._segment = Segment(segment_bytes(needed, MAX_IN_FLIGHT), self._shm_dir)
            except SharedMemoryError as exc:
                self.shm_verdict = f"not used: {exc}"
                return None
            self._slot_bytes = needed
        if self.shm_verdict is None:         # the first segment: can the service read it?
            try:
                self._probe()
            finally:
                if self.shm_verdict != "ok":     # refused, or no answer (raised): a fresh segment next time
                    self._retire_segment()
            if self.shm_verdict != "ok":
                return None
        return Region(self._segment.path, self._segment.memory, slot_offset(request.slot, self._slot_bytes),
                      self._slot_bytes)

    def _probe(self) -> None:
        """Ask the service whether it sees our segment (same machine, same user, shared memory on)."""
        segment = self._segment
        probe = {**segment.ref, "token": segment.token.hex()}
        verdict = self._request(Op.STATUS, shm_probe=probe).header.get("result", {}).get("shared_memory", {})
        verdict = verdict.get("probe") if isinstance(verdict, dict) else None
        self.shm_verdict = "ok" if verdict == "ok" else f"not used: {verdict or 'the service does not offer it'}"

    def _shared_memory_refused(self, reply: Message, request: "_Pending") -> bool:
        """True (and shared memory is off from now on) when the service could not use the request's shared
        memory: the caller sends it again in the message."""
        error = reply.header.get("error") or {}
        if reply.header.get("ok") or not request.shared or error.get("code") != ErrorCode.SHARED_MEMORY:
            return False
        self.shm_verdict = f"not used: {error.get('message', 'the service refused it')}"
        self._retire_segment()
        return True

    def _retire_segment(self) -> None:
        """Remove the segment; the next request gets a fresh one. Called when requests that use it were given up:
        the service may still read them, so nothing may be written into it again."""
        if self._segment is not None:
            self._segment.close()
            self._segment, self._slot_bytes = None, 0

    def _next_id(self) -> str:
        self._counter += 1
        return f"{self._token}-{self._counter}"

    def _send(self, parts: list) -> bool:
        """Queue one request on the socket; False when no service is connected (``immediate``) within
        ``connect_timeout_s`` (the socket is then reset)."""
        try:
            self._socket().send_multipart(parts, copy=False)
            return True
        except zmq.Again:
            self._reset_socket()
            return False

    def _resend(self, pending: Sequence["_Pending"]) -> None:
        """Send the unanswered requests of a stream again, in order, on the current (fresh) socket."""
        for request in pending:
            if not self._send(request.parts):
                return                       # nobody there: the wait for the first reply times out and retries

    def _exchange(self, parts: list, request_id: str, *, attempts: int, timeout_s: float) -> Message | None:
        """Lazy Pirate: send, wait, and on silence reopen the socket and send again; None if nobody answered."""
        for _ in range(attempts):
            if not self._send(parts):  # IMMEDIATE: no connected service within connect_timeout_s
                continue
            reply = self._await_reply(self._socket(), request_id, timeout_s)
            if reply is not None:
                self._answered = True
                return reply
            self._reset_socket()       # a late reply to the old socket must not be read as the next one's
        return None

    def _await_reply(self, sock: zmq.Socket, request_id: str, timeout_s: float) -> Message | None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                return None
            parts = sock.recv_multipart(copy=False)
            try:
                reply = decode_message(parts, _REPLY_LIMITS, request=False)
            except ProtocolError as exc:
                raise OAVMServiceError(exc.code, f"the service at {self.endpoint} sent a reply this client cannot "
                                                 f"read: {exc.message}") from None
            if reply.request_id == request_id:
                return reply
            # a reply to an older request (answered after we gave up on it): discard

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.immediate = True                       # queue only to a connected service ...
            sock.sndtimeo = int(self.connect_timeout_s * 1000)   # ... and give up quickly when there is none
            if self._server_public_key is not None:
                public, secret = self._client_keys or zmq.curve_keypair()
                sock.curve_serverkey = self._server_public_key
                sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _check_size(self, nbytes: int) -> None:
        """Refuse a frame the service would refuse, before sending it (ZeroMQ drops over-size parts silently)."""
        if nbytes <= _ASK_LIMITS_ABOVE:
            return
        if self._service_limits is None:
            self._service_limits = dict(self.status().get("limits", {}))
        limit = self._service_limits.get("max_message_bytes")
        if limit is not None and nbytes > limit:
            raise OAVMServiceError(ErrorCode.TOO_LARGE,
                                   f"this request carries {nbytes / 2**20:.0f} MiB but the service at {self.endpoint} "
                                   f"accepts at most {limit / 2**20:.0f} MiB; send a smaller frame or restart the "
                                   f"service with a larger --max-message-mb")

    def _maybe_autostart(self) -> None:
        """Before the first exchange: if nothing answers a quick ping, start the service and wait until it does."""
        if self.autostart is None or self._answered or self.autostarted is not None:
            return
        if self._ping():
            return
        log_path = Path(tempfile.gettempdir()) / "oavm-service-autostart.log"
        self.autostarted = _spawn_detached(self.autostart, log_path)
        deadline = time.monotonic() + self.autostart_wait_s
        while time.monotonic() < deadline:
            if self._ping():
                return
            code = self.autostarted.poll()
            if code is not None:
                if self._ping(self.timeout_s):    # a service was there after all, only busy: the new one gave way
                    return
                raise OAVMServiceUnavailable(f"the OAVM service started with `{' '.join(self.autostart)}` exited "
                                             f"with code {code}; its output is in {log_path}")
            time.sleep(0.2)
        raise OAVMServiceUnavailable(f"the OAVM service started with `{' '.join(self.autostart)}` did not answer "
                                     f"at {self.endpoint} within {self.autostart_wait_s:g} s; its output is in "
                                     f"{log_path}")

    def _ping(self, timeout_s: float = 5.0) -> bool:
        """One status request, one try: does a service answer within ``timeout_s``?"""
        request_id = self._next_id()
        parts = encode_message(request_header(Op.STATUS, request_id))
        return self._exchange(parts, request_id, attempts=1, timeout_s=min(self.timeout_s, timeout_s)) is not None


@dataclass
class _Pending:
    """A request as the client keeps it until answered: what to send (again, or re-encoded without shared memory),
    its id and parts as last encoded, its slot in the shared-memory segment, whether it used it."""
    op: str
    clip: str | None
    frame: int | None
    buffers: list[Buffer]
    args: dict[str, Any]
    slot: int = 0
    request_id: str = ""
    parts: list = field(default_factory=list)
    shared: bool = False

    @property
    def megabytes(self) -> float:
        return sum(b.array.nbytes for b in self.buffers) / 2**20


def _spawn_detached(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (a detached process on Windows), so that it outlives the host's
    operation and is not hit by the host's Ctrl-C; its output is appended to ``log_path``."""
    detach: dict[str, Any] = ({"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}
                              if os.name == "nt" else {"start_new_session": True})
    try:
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    close_fds=True, **detach)
    except OSError as exc:
        raise OAVMServiceUnavailable(f"cannot start the OAVM service with `{' '.join(argv)}` ({exc}); check the "
                                     f"service command in the plug-in settings") from None


def _tries(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


# ---------------------------------------------------------------------------------------------- validation
def _clip_id(clip_id: str) -> str:
    if not isinstance(clip_id, str) or not clip_id:
        raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"clip id {clip_id!r}: use a non-empty string, e.g. the shot "
                                                      f"name plus the host's scene name")
    return clip_id


def _object_id(obj_id: str) -> str:
    if not isinstance(obj_id, str) or not obj_id:
        raise OAVMServiceError(ErrorCode.BAD_INPUT, f"object id {obj_id!r}: use a non-empty string, e.g. 'actor'")
    return obj_id


def _direction(direction: int) -> int:
    if direction not in (1, -1):
        raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"direction is {direction!r}; use +1 (forward) or -1 "
                                                      f"(backward from the keyframe)")
    return int(direction)


def _frame_index(frame_index: int) -> int:
    if isinstance(frame_index, bool) or not isinstance(frame_index, (int, np.integer)):
        raise OAVMServiceError(ErrorCode.BAD_REQUEST, f"frame index {frame_index!r}: use an integer")
    return int(frame_index)


def _wire_array(array: Any, what: str) -> np.ndarray:
    """float64 becomes float32 (numpy's default float); other dtypes must already be ones the protocol carries."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype.name not in DTYPES:
        raise OAVMServiceError(ErrorCode.BAD_INPUT, f"{what} has dtype {array.dtype}; send float32, float16, uint8 "
                                                    f"or uint16 (e.g. array.astype(np.float32))")
    return array


def _frame_buffer(frame: Any, channels: str | None) -> Buffer:
    array = _wire_array(frame, "the frame")
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise OAVMServiceError(ErrorCode.BAD_INPUT, f"the frame has shape {array.shape}; send (height, width, "
                                                    f"channels) pixels, e.g. (1080, 1920, 3)")
    named = (channels or default_channels(array.shape[2])).upper()
    rgb_order(array.shape[2], named)   # refuses channel names that do not fit, before anything is sent
    return Buffer("frame", array, named)


def _mask_buffer(obj_id: str, mask: Any, frame_hw: tuple[int, ...]) -> Buffer:
    _object_id(obj_id)
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)   # uint8 masks are scaled by 1/255 on the service
    array = to_mask(_wire_array(array, f"the mask of object {obj_id!r}"), obj_id)
    if array.shape != tuple(frame_hw):
        raise OAVMServiceError(ErrorCode.BAD_INPUT, f"the mask of object {obj_id!r} has shape {array.shape} but the "
                                                    f"frame is {tuple(frame_hw)}; send one (height, width) mask per "
                                                    f"object at the frame's resolution")
    return Buffer("mask", array, "A", obj_id)
