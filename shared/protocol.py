# SPDX-License-Identifier: GPL-3.0-or-later
"""The one definition of the OAVM wire protocol, used by the service and by every client (plug-ins, farm).

A message is a ZeroMQ multipart message ``[header, *buffers]``:

* ``header`` is a msgpack map: ``v`` (protocol version), ``op``, ``id`` (request id, echoed by the reply),
  ``clip`` (clip id), ``frame`` (frame index), ``args`` (op arguments) and ``buffers``: one descriptor per
  following part, ``{"name", "dtype", "shape", "channels", "object"}``.
* each buffer part is the raw C-order bytes of one array (float16, float32, uint8 or uint16), so frames travel
  without pickling and are read back with ``np.frombuffer`` without a copy.

Between a client and a service on one machine a request's pixels may instead lie in shared memory
(``shared_memory.py``): the header's ``shm`` names the client's segment, ``{"path", "size"}``, and a descriptor with
``"at": offset`` has no part of its own, its bytes lie in the segment from that offset. Replies always carry their
buffers as parts. A client learns whether the service can read its segment from a ``status`` request with
``args.shm_probe`` (docs/protocol.md).

A reply has the same shape; it adds ``ok`` and either ``result`` (plain values) and the matte buffers, one
``alpha`` and one ``fgmask`` per object id (optionally ``fg``, the premultiplied foreground), or ``error``:
``{"code", "message"}`` where the message says what to do next. docs/protocol.md is the table of ops.

Only numpy, pyzmq, msgpack and the standard library are imported: this module runs inside Blender and Nuke.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np
import zmq

from .shared_memory import SharedMemoryError, aligned

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5590"
# open_clip's reply_dtype: the dtype of a clip's matte buffers (float16 halves what travels back; 11 bits of
# precision, as a half-float EXR matte has)
REPLY_DTYPES = ("float32", "float16")
# requests a client may keep at the service for one clip (the next frame travels while this one is computed);
# the service keeps that many replies per clip to answer resends
MAX_IN_FLIGHT = 2


class Op:
    """The request operations (``header["op"]``)."""
    STATUS = "status"
    OPEN_CLIP = "open_clip"
    MATTE = "matte"
    MATTE_FILE = "matte_file"
    ADD_OBJECT = "add_object"
    REPROMPT = "reprompt"
    PROMPT = "prompt"                  # several objects' masks at one frame: known ones re-prompted, new ones added
    DROP_OBJECT = "drop_object"
    SAVE_CLIP = "save_clip"
    LOAD_CLIP = "load_clip"
    CLOSE_CLIP = "close_clip"
    ALL = (STATUS, OPEN_CLIP, MATTE, MATTE_FILE, ADD_OBJECT, REPROMPT, PROMPT, DROP_OBJECT, SAVE_CLIP, LOAD_CLIP,
           CLOSE_CLIP)


class ErrorCode:
    """The ``error.code`` of an error reply: what kind of thing went wrong, so a client can react to it."""
    BAD_REQUEST = "bad_request"            # not this protocol: not msgpack, truncated, wrong lengths, unknown op
    BAD_INPUT = "bad_input"                # a frame/mask/id the engine cannot use (NaN, wrong size, empty mask)
    UNKNOWN_CLIP = "unknown_clip"          # no open or saved clip of that id
    OUT_OF_ORDER = "out_of_order"          # not the frame the clip expects next (the message names it)
    TOO_LARGE = "too_large"                # frame or message beyond the service's limits
    VERSION_MISMATCH = "version_mismatch"  # another protocol version
    BUSY = "busy"                          # the service is shutting down; retry later
    SHARED_MEMORY = "shared_memory"        # the request's shared memory cannot be used here: send the pixels as parts
    INTERNAL = "internal"                  # a bug or a device failure; the service log has the traceback
    ALL = (BAD_REQUEST, BAD_INPUT, UNKNOWN_CLIP, OUT_OF_ORDER, TOO_LARGE, VERSION_MISMATCH, BUSY, SHARED_MEMORY,
           INTERNAL)


class OAVMServiceError(Exception):
    """An error reply from the service (or a request the client refused to send); ``code`` is an ErrorCode."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


class ProtocolError(OAVMServiceError):
    """A message that breaks this protocol; ``header`` is the part of it that could be read (for the reply id)."""

    def __init__(self, code: str, message: str, header: Mapping[str, Any] | None = None):
        super().__init__(code, message)
        self.header = dict(header) if isinstance(header, Mapping) else {}


class OAVMServiceUnavailable(OAVMServiceError, ConnectionError):
    """No service answered after the client's retries."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


# dtype names on the wire -> numpy dtypes (little-endian, as every machine OAVM runs on)
DTYPES: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<")
                               for name in ("float16", "float32", "uint8", "uint16")}
# the channel names of reply layers
LAYER_CHANNELS: dict[str, str] = {"alpha": "A", "fgmask": "A", "fg": "RGB"}
MAX_HEADER_BYTES = 1 << 20
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts; checked against the header *before* any pixel is looked at or allocated."""
    max_frame_pixels: int = 40_000_000        # an 8K full-aperture frame is ~35 Mpx
    max_message_bytes: int = 1 << 30          # sum of all buffers of one message
    max_buffers: int = 256                    # a frame and its masks, or a reply's layers


@dataclass
class Buffer:
    """One array of a message: ``name`` says what it is ("frame", "mask", "alpha", ...), ``object`` whose it is."""
    name: str
    array: np.ndarray
    channels: str = ""
    object: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.array.dtype.name, "shape": list(self.array.shape),
                "channels": self.channels, "object": self.object}


@dataclass
class Region:
    """Bytes [start, start + nbytes) of a shared-memory segment (``memory`` maps all of it), where a request's
    buffers are written instead of travelling as parts."""
    path: str
    memory: memoryview
    start: int
    nbytes: int


@dataclass
class Message:
    """A decoded message: its header (without the buffer descriptors) and its buffers, in order."""
    header: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def op(self) -> str | None:
        return self.header.get("op")

    @property
    def request_id(self) -> str | int | None:
        return self.header.get("id")

    @property
    def clip(self) -> str | None:
        return self.header.get("clip")

    @property
    def frame(self) -> int | None:
        return self.header.get("frame")

    @property
    def args(self) -> dict[str, Any]:
        return self.header.get("args") or {}

    def buffer(self, name: str) -> Buffer | None:
        """The first buffer called ``name`` that belongs to no object (e.g. the "frame")."""
        return next((b for b in self.buffers if b.name == name and b.object is None), None)

    def per_object(self, name: str) -> dict[str, Buffer]:
        """The buffers called ``name`` keyed by object id (e.g. each object's "mask")."""
        return {b.object: b for b in self.buffers if b.name == name and b.object is not None}


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` can only be reached from this machine (tcp on a loopback address, ipc, inproc)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:      # "*", an interface name or a host name: beyond loopback
        return False


# ------------------------------------------------------------------------------------------------ headers
def request_header(op: str, request_id: str | int, *, clip: str | None = None, frame: int | None = None,
                   **args: Any) -> dict[str, Any]:
    return {"op": op, "id": request_id, "clip": clip, "frame": frame, "args": args}


def reply_header(request: Mapping[str, Any] | None, *, result: Mapping[str, Any] | None = None,
                 clip: str | None = None, frame: int | None = None) -> dict[str, Any]:
    request = request or {}
    return {"op": request.get("op"), "id": request.get("id"), "ok": True,
            "clip": request.get("clip") if clip is None else clip,
            "frame": request.get("frame") if frame is None else frame, "result": dict(result or {})}


def error_header(request: Mapping[str, Any] | None, code: str, message: str) -> dict[str, Any]:
    request = request or {}
    return {"op": request.get("op"), "id": request.get("id"), "ok": False, "clip": request.get("clip"),
            "frame": request.get("frame"), "error": {"code": code, "message": message}}


def raise_for_error(reply: Message) -> Message:
    """Return ``reply`` if it is a success, else raise the OAVMServiceError it carries."""
    if reply.header.get("ok"):
        return reply
    error = reply.header.get("error") or {}
    raise OAVMServiceError(str(error.get("code", ErrorCode.INTERNAL)),
                           str(error.get("message", "the service sent an error reply without a message")))


# ------------------------------------------------------------------------------------------------ encode
def encode_message(header: Mapping[str, Any], buffers: Sequence[Buffer] = (), *, region: Region | None = None
                   ) -> list:
    """``[msgpack header, *arrays]``, ready for ``socket.send_multipart(parts, copy=False)``.

    The arrays themselves are the parts (made C-contiguous, which is a no-op for the usual frame), so pyzmq sends
    big frames without copying them; the caller must not modify them until the send returns.

    With a ``region`` (requests only) the buffers are copied into it, in order, as long as they fit (the rest go as
    parts): one copy into memory the service maps, instead of two through the kernel.
    """
    arrays = []
    for buf in buffers:
        array = np.ascontiguousarray(buf.array)
        if array.dtype.name not in DTYPES:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"buffer {buf.name!r} has dtype {array.dtype.name}; the protocol carries "
                                f"{', '.join(DTYPES)} (convert it with array.astype(np.float32))")
        if array.dtype.byteorder == ">":
            array = array.astype(DTYPES[array.dtype.name])
        arrays.append(array)
    described = [Buffer(b.name, a, b.channels, b.object).describe() for b, a in zip(buffers, arrays)]
    parts = arrays
    if region is not None:
        parts = []
        offset, end = aligned(region.start), region.start + region.nbytes
        for desc, array in zip(described, arrays):
            if offset + array.nbytes <= end:
                np.frombuffer(region.memory, array.dtype, array.size, offset).reshape(array.shape)[...] = array
                desc["at"] = offset
                offset = aligned(offset + array.nbytes)
            else:
                parts.append(array)
    head = {**header, "v": PROTOCOL_VERSION, "buffers": described}
    if region is not None:
        head["shm"] = {"path": region.path, "size": region.memory.nbytes}
    return [msgpack.packb(head, use_bin_type=True), *parts]


# ------------------------------------------------------------------------------------------------ decode
def decode_message(parts: Sequence[zmq.Frame | bytes | memoryview], limits: Limits = Limits(), *,
                   request: bool = True, shared_memory: Callable[[Any], memoryview] | None = None) -> Message:
    """Check and decode a received multipart message; the arrays are views of the received bytes (no copy).

    Everything is checked against the header before the buffers are touched (declared sizes against ``limits``
    first, so a header claiming 100000x100000 pixels is refused without allocating anything). Raises
    ProtocolError whose ``header`` holds whatever was readable, so that the error reply can echo the request id.

    ``shared_memory`` maps the segment a request's ``shm`` names (the service's ``SegmentMap.memory``); without it
    a message whose pixels lie in shared memory is refused.
    """
    if not parts:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "empty message: send [msgpack header, *buffers] "
                                                   "as described in docs/protocol.md")
    header = _unpack_header(_view(parts[0]))
    if request:
        _check_request_fields(header)
    descriptors = _check_descriptors(header, n_parts=len(parts) - 1, limits=limits)
    memory = _shared_memory(header, descriptors, shared_memory)
    inline = iter(parts[1:])
    buffers = [_array_from(desc, _view(next(inline)) if desc.at is None else memory[desc.at:desc.at + desc.nbytes],
                           header) for desc in descriptors]
    header.pop("buffers", None)
    return Message(header, buffers)


def _view(part: zmq.Frame | bytes | memoryview) -> memoryview:
    return memoryview(part.buffer if isinstance(part, zmq.Frame) else part).cast("B")


def _unpack_header(data: memoryview) -> dict[str, Any]:
    if data.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"the header is {data.nbytes} bytes; at most {MAX_HEADER_BYTES} "
                                                 f"are accepted (pixels go in buffers, not in the header)")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"the first part is not a msgpack header ({type(exc).__name__}: {exc}); build messages "
                            f"with shared.protocol.encode_message or follow docs/protocol.md") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the header must be a msgpack map, not {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"this side speaks OAVM protocol {PROTOCOL_VERSION}, the message is protocol "
                            f"{version!r}; install matching versions of the OAVM service and plug-in", header)
    return header


def _check_request_fields(header: dict[str, Any]) -> None:
    request_id = header.get("id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool) or len(str(request_id)) > MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "the header needs an 'id' (a string or integer request id, "
                                                   f"at most {MAX_ID_CHARS} characters)", header)
    op = header.get("op")
    if op not in Op.ALL:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown op {op!r}; this service knows {', '.join(Op.ALL)}",
                            header)
    clip = header.get("clip")
    if clip is not None and (not isinstance(clip, str) or not clip or len(clip) > MAX_ID_CHARS):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'clip' must be a non-empty string of at most {MAX_ID_CHARS} "
                                                   f"characters, not {clip!r}", header)
    frame = header.get("frame")
    if frame is not None and not _is_int(frame):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'frame' must be an integer frame index, not {frame!r}", header)
    if not isinstance(header.get("args", {}) or {}, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'args' must be a map of op arguments", header)


@dataclass(frozen=True)
class _Descriptor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    channels: str
    object: str | None
    at: int | None = None       # offset in the header's shared-memory segment; None: the next part

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize  # math.prod needs 3.8 (Nuke 13: 3.7)


def _check_descriptors(header: dict[str, Any], *, n_parts: int, limits: Limits) -> list[_Descriptor]:
    raw = header.get("buffers", [])
    if not isinstance(raw, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'buffers' must be a list of buffer descriptors", header)
    if len(raw) > limits.max_buffers:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(raw)} buffers in one message; at most {limits.max_buffers}",
                            header)
    descriptors = [_descriptor(d, i, header) for i, d in enumerate(raw)]
    n_inline = sum(d.at is None for d in descriptors)
    if n_inline != n_parts:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"truncated or padded message: the header describes {n_inline} buffer(s) but {n_parts} "
                            f"part(s) follow it; send one part per descriptor (except those with an offset 'at', "
                            f"which lie in shared memory)", header)
    for desc in descriptors:
        if len(desc.shape) >= 2 and desc.shape[0] * desc.shape[1] > limits.max_frame_pixels:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"buffer {desc.name!r} is {desc.shape[1]}x{desc.shape[0]} = "
                                f"{desc.shape[0] * desc.shape[1]} pixels; this service accepts at most "
                                f"{limits.max_frame_pixels} per frame: send a smaller frame or start the service "
                                f"with a larger --max-frame-pixels", header)
    total = sum(d.nbytes for d in descriptors)
    if total > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"the message declares {total / 2**20:.1f} MiB of buffers; this service accepts at most "
                            f"{limits.max_message_bytes / 2**20:.0f} MiB: send a smaller frame or start the service "
                            f"with a larger --max-message-mb", header)
    return descriptors


def _descriptor(raw: Any, index: int, header: dict[str, Any]) -> _Descriptor:
    def bad(what: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_REQUEST, f"buffer descriptor {index}: {what}", header)

    if not isinstance(raw, dict):
        raise bad("must be a map {name, dtype, shape, channels, object}")
    name, dtype, shape = raw.get("name"), raw.get("dtype"), raw.get("shape")
    channels, obj = raw.get("channels") or "", raw.get("object")
    if not isinstance(name, str) or not name:
        raise bad("needs a 'name' string")
    if dtype not in DTYPES:
        raise bad(f"{name!r} has dtype {dtype!r}; send one of {', '.join(DTYPES)}")
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4
            or not all(_is_int(n) and n >= 0 for n in shape)):
        raise bad(f"{name!r} has shape {shape!r}; send 1 to 4 non-negative integers, e.g. [height, width, 3]")
    if not isinstance(channels, str) or (channels and len(shape) == 3 and len(channels) != shape[2]):
        raise bad(f"{name!r} names channels {channels!r} for shape {list(shape)}; name one letter per channel")
    if obj is not None and (not isinstance(obj, str) or not obj or len(obj) > MAX_ID_CHARS):
        raise bad(f"{name!r} has object id {obj!r}; object ids are non-empty strings")
    at = raw.get("at")
    if at is not None and (not _is_int(at) or at < 0):
        raise bad(f"{name!r} has offset 'at' {at!r}; a byte offset in the shared-memory segment is an integer >= 0")
    return _Descriptor(name, DTYPES[dtype], tuple(shape), channels.upper(), obj, at)


def _shared_memory(header: dict[str, Any], descriptors: list[_Descriptor],
                   resolve: Callable[[Any], memoryview] | None) -> memoryview | None:
    """The segment a message's ``shm`` names, checked against the offsets of its buffers (None without one)."""
    ref = header.get("shm")
    if ref is None:
        if any(d.at is not None for d in descriptors):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a buffer descriptor has an offset 'at' but the header names "
                                                       "no shared-memory segment ('shm')", header)
        return None
    if resolve is None:
        raise ProtocolError(ErrorCode.SHARED_MEMORY, "this side takes no shared memory (a service beyond loopback, "
                                                     "or one started with --no-shared-memory); send the pixels as "
                                                     "message parts", header)
    try:
        memory = resolve(ref)
    except SharedMemoryError as exc:
        raise ProtocolError(ErrorCode.SHARED_MEMORY, f"the request's shared memory cannot be used: {exc}; send the "
                                                     f"pixels as message parts", header) from None
    for desc in descriptors:
        if desc.at is not None and desc.at + desc.nbytes > memory.nbytes:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {desc.name!r} lies at bytes {desc.at}-"
                                                       f"{desc.at + desc.nbytes} of a {memory.nbytes}-byte segment",
                                header)
    return memory


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _array_from(desc: _Descriptor, data: memoryview, header: dict[str, Any]) -> Buffer:
    if data.nbytes != desc.nbytes:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"buffer {desc.name!r} declares shape {list(desc.shape)} {desc.dtype.name} = "
                            f"{desc.nbytes} bytes but {data.nbytes} bytes arrived; send the array's raw C-order "
                            f"bytes (np.ascontiguousarray(a).tobytes())", header)
    array = np.frombuffer(data, dtype=desc.dtype).reshape(desc.shape)
    return Buffer(desc.name, array, desc.channels, desc.object)


# ------------------------------------------------------------------------------------------------ pixels
def default_channels(n_channels: int) -> str:
    """The channel order assumed when a sender names none: RGB or RGBA."""
    return {3: "RGB", 4: "RGBA"}.get(n_channels, "")


def rgb_order(n_channels: int, channels: str = "") -> list[int]:
    """Where R, G and B are among ``n_channels`` channels named ``channels`` (e.g. "BGR" -> [2, 1, 0]).

    Unnamed 3 or 4 channels are RGB or RGBA; anything that does not name R, G and B once each is refused.
    """
    channels = (channels or default_channels(n_channels)).upper()
    if len(channels) != n_channels or any(channels.count(c) != 1 for c in "RGB"):
        raise ProtocolError(ErrorCode.BAD_INPUT,
                            f"the frame's channel names {channels or '(none)'!r} do not fit its {n_channels} "
                            f"channels or do not name R, G and B once each; name them, e.g. 'RGB', 'BGR', 'RGBA'")
    return [channels.index(c) for c in "RGB"]


def to_rgb(array: np.ndarray, channels: str = "") -> np.ndarray:
    """(H, W, C) pixels in the named channel order (RGB, BGR, RGBA, ABGR, ...) -> (H, W, 3) RGB.

    A view when R, G, B are already the first three channels (RGB, RGBA), else a copy in RGB order.
    """
    if array.ndim != 3:
        raise ProtocolError(ErrorCode.BAD_INPUT, f"the frame has shape {list(array.shape)}; send (height, width, "
                                                 f"channels) pixels with 3 or 4 channels")
    order = rgb_order(array.shape[2], channels)
    return array[..., :3] if order == [0, 1, 2] else array[..., order]


def to_mask(array: np.ndarray, obj_id: str = "") -> np.ndarray:
    """(H, W) or (H, W, 1) mask -> (H, W)."""
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0]
    if array.ndim != 2:
        raise ProtocolError(ErrorCode.BAD_INPUT, f"the mask of object {obj_id!r} has shape {list(array.shape)}; "
                                                 f"send one channel, shape (height, width)")
    return array


def layer_buffers(layers: Mapping[str, Mapping[str, np.ndarray]]) -> list[Buffer]:
    """Reply buffers for ``{obj_id: {"alpha": a, "fgmask": m[, "fg": f]}}``."""
    return [Buffer(name, array, LAYER_CHANNELS.get(name, ""), obj)
            for obj, named in layers.items() for name, array in named.items()]


def layers_from_buffers(buffers: Iterable[Buffer]) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of layer_buffers: ``{obj_id: {layer name: array}}``."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for buf in buffers:
        if buf.object is not None:
            layers.setdefault(buf.object, {})[buf.name] = buf.array
    return layers
