# SPDX-License-Identifier: GPL-3.0-or-later
"""Read and write scanline OpenEXR files with numpy and the standard library only.

Why this exists: Nuke's Python has no OpenImageIO, and ``nuke.sample`` reads one pixel per call (minutes per HD
frame). The gizmo instead renders its inputs to EXR with a Write node and reads them here, and it writes the mattes
the service returns as EXR files that the gizmo's own Read node shows. Only what those two jobs need is supported:
single-part scanline files, HALF/FLOAT/UINT channels, compression NONE, ZIPS (1 line) and ZIP (16 lines). Anything
else (tiled, multi-part, deep, PIZ, DWA...) is refused with a message that names the Write node setting to use.

The layout follows the OpenEXR file-layout document: magic + version, a header of ``name\\0type\\0size value``
attributes ended by a null byte, an offset table with one uint64 per chunk, then chunks of ``(int32 y,
int32 size, data)`` where data holds, for each scanline of the chunk, each channel (sorted by name) in turn.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Tuple

import numpy as np

MAGIC = 20000630
_SINGLE_PART_SCANLINE = 2            # version 2, no tiled / long-name / deep / multi-part flags
_TILED, _LONG_NAMES, _NON_IMAGE, _MULTIPART = 0x200, 0x400, 0x800, 0x1000

NONE, RLE, ZIPS, ZIP = 0, 1, 2, 3
COMPRESSION_NAMES = {0: "none", 1: "RLE", 2: "Zip (1 scanline)", 3: "Zip (16 scanlines)", 4: "PIZ", 5: "PXR24",
                     6: "B44", 7: "B44A", 8: "DWAA", 9: "DWAB"}
_LINES_PER_CHUNK = {NONE: 1, ZIPS: 1, ZIP: 16}
# OpenEXR's own default since 3.1.3 ("2x faster than 6, a tiny drop in compression ratio"): a 1080p matte's chunks
# deflate in well under half the time of level 6 for a file a few per cent larger
ZIP_LEVEL = 4

UINT, HALF, FLOAT = 0, 1, 2
_DTYPES = {UINT: np.dtype("<u4"), HALF: np.dtype("<f2"), FLOAT: np.dtype("<f4")}

Box = Tuple[int, int, int, int]      # xmin, ymin, xmax, ymax (inclusive, as in the file)


class ExrError(ValueError):
    """A file this module cannot read or an image it cannot write; the message says what to change."""


@dataclass
class ExrImage:
    """The channels of one EXR file, each (height, width) float32 over the data window."""
    channels: Dict[str, np.ndarray]
    data_window: Box
    display_window: Box
    compression: int = NONE
    attributes: Dict[str, bytes] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.data_window[2] - self.data_window[0] + 1

    @property
    def height(self) -> int:
        return self.data_window[3] - self.data_window[1] + 1

    def channel(self, *names: str) -> np.ndarray:
        """The first channel present among ``names`` (e.g. ``"A", "alpha"``)."""
        for name in names:
            if name in self.channels:
                return self.channels[name]
        raise ExrError("no channel %s in this EXR (it has %s); render the input with those channels"
                       % (" or ".join(names), ", ".join(sorted(self.channels)) or "none"))

    def in_display_window(self) -> "ExrImage":
        """The same image cropped or padded (with zeros) to the display window, the frame the artist sees.

        Nuke writes the bounding box as the data window, which can be larger (overscan) or smaller than the format.
        """
        if self.data_window == self.display_window:
            return self
        dx0, dy0, dx1, dy1 = self.display_window
        out_w, out_h = dx1 - dx0 + 1, dy1 - dy0 + 1
        x0, y0 = self.data_window[0], self.data_window[1]
        sx0, sy0 = max(dx0, x0), max(dy0, y0)
        sx1, sy1 = min(dx1, self.data_window[2]), min(dy1, self.data_window[3])
        channels = {}
        for name, plane in self.channels.items():
            canvas = np.zeros((out_h, out_w), dtype=plane.dtype)
            if sx1 >= sx0 and sy1 >= sy0:
                canvas[sy0 - dy0:sy1 - dy0 + 1, sx0 - dx0:sx1 - dx0 + 1] = \
                    plane[sy0 - y0:sy1 - y0 + 1, sx0 - x0:sx1 - x0 + 1]
            channels[name] = canvas
        return ExrImage(channels, self.display_window, self.display_window, self.compression, self.attributes)


# ---------------------------------------------------------------------------------------------------- reading

def read_header(path: str) -> Tuple[Dict[str, Tuple[str, bytes]], int]:
    """The header attributes ``{name: (type, raw value)}`` and the byte offset where the offset table starts."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if len(head) < 8:
            raise ExrError("%s is not an EXR file (too short); render it again" % path)
        magic, version = struct.unpack_from("<ii", head, 0)
        if magic != MAGIC:
            raise ExrError("%s is not an OpenEXR file; set the Write node's file type to exr" % path)
        if version & (_TILED | _NON_IMAGE | _MULTIPART):
            raise ExrError("%s is a tiled, deep or multi-part EXR; render a plain scanline EXR "
                           "(Write node: file type exr, no tiles, one part)" % path)
        pos, attrs = 8, {}
        while True:
            while True:   # the header may be larger than the first read
                end = head.find(b"\0", pos)
                if end >= 0:
                    break
                more = f.read(1 << 16)
                if not more:
                    raise ExrError("%s has a truncated header; render it again" % path)
                head += more
            if end == pos:
                return attrs, pos + 1
            name = head[pos:end].decode("ascii", "replace")
            tend = head.index(b"\0", end + 1)
            typ = head[end + 1:tend].decode("ascii", "replace")
            (size,) = struct.unpack_from("<i", head, tend + 1)
            start = tend + 5
            while len(head) < start + size + 1:
                more = f.read(max(1 << 16, start + size + 1 - len(head)))
                if not more:
                    raise ExrError("%s has a truncated header; render it again" % path)
                head += more
            attrs[name] = (typ, head[start:start + size])
            pos = start + size


def _box(raw: bytes) -> Box:
    return struct.unpack("<iiii", raw)


def _channel_list(raw: bytes) -> list:
    """``[(name, pixel_type, x_sampling, y_sampling)]`` from a ``chlist`` attribute."""
    out, pos = [], 0
    while raw[pos:pos + 1] != b"\0":
        end = raw.index(b"\0", pos)
        name = raw[pos:end].decode("utf-8")
        ptype, _linear, xs, ys = struct.unpack_from("<iB3xii", raw, end + 1)
        out.append((name, ptype, xs, ys))
        pos = end + 1 + 16
    return out


def _unzip(data: bytes, expected: int) -> bytes:
    """Undo EXR's ZIP coding: inflate, undo the byte-delta predictor, re-interleave the two byte halves."""
    d = np.frombuffer(zlib.decompress(data), dtype=np.uint8).copy()
    if d.size != expected:
        raise ExrError("a ZIP chunk inflated to %d bytes, expected %d; the file is damaged" % (d.size, expected))
    d[1:] -= np.uint8(128)                       # uint8 arithmetic wraps: the predictor's "mod 256" for free
    t = np.cumsum(d, dtype=np.uint8)
    half = (expected + 1) // 2
    out = np.empty(expected, dtype=np.uint8)
    out[0::2] = t[:half]
    out[1::2] = t[half:]
    return out.tobytes()


@dataclass
class _Layout:
    """What reading a file's chunks needs from its header (checked: a layout this module can read)."""
    attrs: Dict[str, Tuple[str, bytes]]
    table_at: int                     # where the offset table starts
    channels: list                    # [(name, pixel_type, x_sampling, y_sampling)], sorted by name as stored
    data_window: Box
    display_window: Box
    compression: int

    @property
    def lines(self) -> int:
        return _LINES_PER_CHUNK[self.compression]

    @property
    def n_chunks(self) -> int:
        height = self.data_window[3] - self.data_window[1] + 1
        return (height + self.lines - 1) // self.lines


def _layout(path: str) -> _Layout:
    attrs, table_at = read_header(path)
    for required in ("channels", "compression", "dataWindow", "displayWindow"):
        if required not in attrs:
            raise ExrError("%s lacks the required '%s' header attribute; render it again" % (path, required))
    if "tiles" in attrs:
        raise ExrError("%s is tiled; render a scanline EXR (Write node: untiled)" % path)
    compression = attrs["compression"][1][0]
    if compression not in _LINES_PER_CHUNK:
        raise ExrError("%s uses %s compression, which the OAVM gizmo cannot read in Nuke's Python; set the Write "
                       "node's compression to 'Zip (1 scanline)', 'Zip (16 scanlines)' or 'none'"
                       % (path, COMPRESSION_NAMES.get(compression, str(compression))))
    chans = _channel_list(attrs["channels"][1])
    for name, ptype, xs, ys in chans:
        if (xs, ys) != (1, 1) or ptype not in _DTYPES:
            raise ExrError("%s: channel %s is subsampled or of an unknown type; render full-resolution "
                           "half or float channels" % (path, name))
    return _Layout(attrs, table_at, chans, _box(attrs["dataWindow"][1]), _box(attrs["displayWindow"][1]),
                   compression)


def _chunks(path: str, layout: _Layout) -> Iterator[Tuple[int, bytes]]:
    """``(first line y, data as stored)`` of every chunk, in the offset table's order (increasing y, wherever the
    writer placed the chunk in the file)."""
    with open(path, "rb") as f:
        f.seek(layout.table_at)
        offsets = struct.unpack("<%dQ" % layout.n_chunks, f.read(8 * layout.n_chunks))
        for offset in offsets:
            f.seek(offset)
            head = f.read(8)
            if len(head) != 8:
                raise ExrError("%s is truncated (its offset table points past the end); render it again" % path)
            y, size = struct.unpack("<ii", head)
            data = f.read(size)
            if len(data) != size:
                raise ExrError("%s is truncated (chunk at line %d); render it again" % (path, y))
            yield y, data


def read_exr(path: str, *, keep_half: bool = False) -> ExrImage:
    """Read every channel of a scanline EXR as float32 planes over its data window; ``keep_half``: half channels
    as float16 planes (a Source frame sent as pixels then takes the sRGB curve's table, ``shared/colour.py``)."""
    path = os.fspath(path)
    layout = _layout(path)
    chans, dw, lines = layout.channels, layout.data_window, layout.lines
    width, height = dw[2] - dw[0] + 1, dw[3] - dw[1] + 1
    row_bytes = [width * _DTYPES[t].itemsize for _, t, _, _ in chans]
    line_bytes = sum(row_bytes)                                  # a line holds each channel's row in turn
    planes = {name: np.empty((height, width), dtype=np.float16 if keep_half and t == HALF else np.float32)
              for name, t, _, _ in chans}
    for y, data in _chunks(path, layout):
        n_lines = min(lines, dw[3] - y + 1)
        expected = n_lines * line_bytes
        if len(data) < expected:   # compressed; a chunk that did not shrink is stored raw, as OpenEXR does
            data = _unzip(data, expected)
        pos, row0 = 0, y - dw[1]
        for (name, ptype, _, _), nbytes in zip(chans, row_bytes):
            dtype = _DTYPES[ptype]     # a strided view of one channel's rows (numpy < 1.23, Nuke's, included)
            planes[name][row0:row0 + n_lines] = np.ndarray((n_lines, width), dtype, buffer=data, offset=pos,
                                                           strides=(line_bytes, dtype.itemsize))
            pos += nbytes
    return ExrImage(planes, dw, layout.display_window, layout.compression, {k: v[1] for k, v in layout.attrs.items()})


def stored_pixels_digest(path: str) -> Tuple[str, bool]:
    """``(digest, data window == display window)`` of a render, from its pixel data as stored, without decoding.

    sha256 over the channel list, both windows, the compression and each chunk's line and bytes, in line order;
    no other header attribute, since Nuke's Write stamps render times into the header. Equal renders give equal
    digests (deflate is deterministic); other pixels, windows or channels give other digests. The same pixels
    stored with another compression also do: a re-analysis, never a stale matte (the gizmo's Write nodes always
    render Zip (16 scanlines)). About 40x faster than decoding and hashing the pixels (docs/nuke.md)."""
    path = os.fspath(path)
    layout = _layout(path)
    h = hashlib.sha256()
    for name in ("channels", "dataWindow", "displayWindow", "compression"):
        h.update(name.encode() + b"\0" + layout.attrs[name][1])
    for y, data in _chunks(path, layout):
        h.update(struct.pack("<iQ", y, len(data)))
        h.update(data)
    return h.hexdigest(), layout.data_window == layout.display_window


# ---------------------------------------------------------------------------------------------------- writing

def _attr(name: str, typ: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + typ.encode() + b"\0" + struct.pack("<i", len(value)) + value


def _predict(chunks: np.ndarray) -> np.ndarray:
    """EXR's ZIP predictor for each row of ``chunks`` (n, bytes) uint8 at once (the inverse of ``_unzip``'s): the
    even bytes then the odd ones, then each byte minus the one before it, + 128 (uint8 arithmetic wraps: mod 256)."""
    t = np.concatenate([chunks[:, 0::2], chunks[:, 1::2]], axis=1)
    d = np.empty_like(t)
    d[:, 0] = t[:, 0]
    np.subtract(t[:, 1:], t[:, :-1], out=d[:, 1:])
    d[:, 1:] += np.uint8(128)
    return d


def _deflate_all(predicted: list, raw_sizes: list) -> list:
    """Deflate each chunk (zlib lets other threads run while it works, so large images use several cores); a chunk
    that does not shrink is stored raw, as OpenEXR does (None here)."""
    def one(i: int):
        packed = zlib.compress(predicted[i], ZIP_LEVEL)
        return packed if len(packed) < raw_sizes[i] else None
    workers = min(8, os.cpu_count() or 1)
    if workers < 2 or len(predicted) < 16:
        return [one(i) for i in range(len(predicted))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(predicted))))


def write_exr(path: str, channels: Mapping[str, np.ndarray], *, pixel_type: int = HALF, compression: int = ZIP,
              display_window: Box | None = None, origin: Tuple[int, int] = (0, 0)) -> None:
    """Write ``channels`` (name -> (H, W) array) as one scanline EXR, atomically (temp file + rename).

    Atomic so that a cancelled analysis or a crash never leaves a half-written matte that Nuke's Read would show.
    """
    if not channels:
        raise ExrError("write_exr needs at least one channel")
    if compression not in _LINES_PER_CHUNK or pixel_type not in _DTYPES:
        raise ExrError("write_exr supports compression none/ZIPS/ZIP and pixel types UINT/HALF/FLOAT")
    names = sorted(channels)
    shapes = {np.shape(channels[n]) for n in names}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ExrError("all channels must be 2-D arrays of one size, got %s" % sorted(shapes))
    height, width = next(iter(shapes))
    dtype = _DTYPES[pixel_type]
    planes = [np.ascontiguousarray(np.asarray(channels[n]), dtype=dtype) for n in names]
    dw = (origin[0], origin[1], origin[0] + width - 1, origin[1] + height - 1)
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", pixel_type, 0, 1, 1) for n in names) + b"\0"
    header = b"".join([
        struct.pack("<ii", MAGIC, _SINGLE_PART_SCANLINE),
        _attr("channels", "chlist", chlist),
        _attr("compression", "compression", bytes([compression])),
        _attr("dataWindow", "box2i", struct.pack("<iiii", *dw)),
        _attr("displayWindow", "box2i", struct.pack("<iiii", *(display_window or dw))),
        _attr("lineOrder", "lineOrder", b"\0"),
        _attr("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        _attr("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        _attr("screenWindowWidth", "float", struct.pack("<f", 1.0)),
        b"\0",
    ])
    lines = _LINES_PER_CHUNK[compression]
    # a chunk holds, line by line, each channel's row in name order: exactly the bytes of (H, C, W) rows
    rows = np.stack(planes, axis=1).reshape(height, -1).view(np.uint8)
    starts = list(range(0, height, lines))
    raws = [rows[y0:y0 + lines].reshape(-1) for y0 in starts]
    if compression == NONE:
        datas = [r.tobytes() for r in raws]
    else:
        full = len(raws) if height % lines == 0 else len(raws) - 1
        predicted = list(_predict(rows[:full * lines].reshape(full, -1))) if full else []
        predicted += [_predict(r[None])[0] for r in raws[full:]]
        packed = _deflate_all([p.tobytes() for p in predicted], [r.size for r in raws])
        datas = [r.tobytes() if z is None else z for r, z in zip(raws, packed)]
    chunks = [struct.pack("<ii", dw[1] + y0, len(data)) + data for y0, data in zip(starts, datas)]
    offsets, at = [], len(header) + 8 * len(chunks)
    for chunk in chunks:
        offsets.append(at)
        at += len(chunk)
    from shared.files import remove_quietly, temporary_path   # imported here: the core stays importable alone
    tmp = str(temporary_path(path))      # hidden, renamed when complete: Nuke never reads half a matte
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(struct.pack("<%dQ" % len(offsets), *offsets))
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)              # a full disk's partial file must not stay and hold the space
