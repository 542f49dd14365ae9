# SPDX-License-Identifier: GPL-3.0-or-later
"""Movie files in (plates delivered as ProRes/H.264/DNx...) and the demo's preview movie out, through PyAV.

A movie's frames are numbered from ``first_frame`` (0 by default, ``--first-frame 1001`` to match the edit), so
the rest of the batch command treats a movie exactly like an image sequence. Movie pixels are display-referred
(Rec.709/sRGB video), so no transfer curve is applied to them.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from oavm_service.errors import OAVMInputError

MOVIE_EXTENSIONS = frozenset({".mov", ".mp4", ".m4v", ".mkv", ".avi", ".mxf", ".webm", ".mpg", ".mpeg", ".y4m"})
_CACHE_BYTES = 256 * 1024 * 1024     # decoded frames kept, so a backward run does not re-decode a GOP per frame


def _pyav():
    """PyAV, imported on first use: only movies need it, so image sequences, training, evaluation and the service
    run where it is not installed (e.g. a GPU machine set up for torch alone)."""
    try:
        import av
    except ImportError:
        raise OAVMInputError("movies need PyAV: install it with `pip install av==18.1.0` (requirements/service.txt), "
                             "or convert the movie to an image sequence") from None
    return av


def is_movie(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in MOVIE_EXTENSIONS


class MovieReader:
    """Random access to a movie's frames by frame number: decodes forwards, seeks to a keyframe to go back."""

    def __init__(self, path: str | os.PathLike, *, first_frame: int = 0) -> None:
        self.path = Path(path)
        self.first_frame = first_frame
        if not self.path.exists():
            raise OAVMInputError(f"{self.path} does not exist; check the movie path.")
        av = _pyav()
        try:
            self._container = av.open(str(self.path))
        except av.error.FFmpegError as exc:
            raise OAVMInputError(f"cannot open movie {self.path}: {exc}; is it a complete movie file?") from None
        if not self._container.streams.video:
            self._container.close()
            raise OAVMInputError(f"{self.path} has no video stream.")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self.width = self._stream.codec_context.width
        self.height = self._stream.codec_context.height
        self.rate = Fraction(self._stream.average_rate or self._stream.guessed_rate or 24)
        self._origin_pts: int | None = None
        self._decoder: Iterator | None = None
        self._next_index = 0
        self._at_top = True
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.frame_count = self._stream.frames or self._count_packets()

    # -- public --------------------------------------------------------------------------------------------

    def frames(self) -> list[int]:
        return list(range(self.first_frame, self.first_frame + self.frame_count))

    def read(self, frame: int) -> np.ndarray:
        """Frame ``frame`` as (H, W, 3) float32 in [0, 1] (8-bit and deeper sources keep their precision)."""
        index = frame - self.first_frame
        if not 0 <= index < self.frame_count:
            raise OAVMInputError(
                f"{self.path} has frames {self.first_frame}-{self.first_frame + self.frame_count - 1}; "
                f"there is no frame {frame}. Check --frames and --first-frame.")
        if index not in self._cache:
            if index < self._next_index or self._decoder is None:
                self._seek(index)
            self._decode_until(index)
        self._cache.move_to_end(index)
        pixels = self._cache[index]
        scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
        return pixels.astype(np.float32) / scale

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "MovieReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- decoding ------------------------------------------------------------------------------------------

    def _count_packets(self) -> int:
        """Frame count for containers that do not store it (MKV, some MOV): count the video packets."""
        count = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        self._container.seek(0)
        return count

    def _index_of(self, av_frame) -> int:
        pts = av_frame.pts if av_frame.pts is not None else 0
        if self._origin_pts is None:
            self._origin_pts = pts
        return round((pts - self._origin_pts) * self._stream.time_base * self.rate)

    def _seek(self, index: int) -> None:
        self._at_top = self._origin_pts is None or index == 0
        if self._at_top:
            self._container.seek(0)
        else:
            target = self._origin_pts + int(index / (self.rate * self._stream.time_base))
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._next_index = -1

    def _decode_until(self, index: int) -> None:
        av = _pyav()
        try:
            while True:
                av_frame = next(self._decoder, None)
                if av_frame is None:
                    raise OAVMInputError(f"{self.path} ended before frame {self.first_frame + index}; "
                                         "the file may be truncated.")
                got = self._index_of(av_frame)
                self._next_index = got + 1
                if got > index:                       # the seek landed past it (no keyframe before): from the top
                    if self._at_top:
                        raise OAVMInputError(
                            f"{self.path} has no frame at position {index} (variable frame rate?); "
                            "convert it to an image sequence or a constant-frame-rate movie.")
                    self._at_top = True
                    self._container.seek(0)
                    self._decoder = self._container.decode(self._stream)
                    continue
                self._remember(got, self._to_array(av_frame))
                if got == index:
                    return
        except av.error.FFmpegError as exc:
            raise OAVMInputError(f"{self.path} is corrupt near frame {self.first_frame + index}: {exc}; "
                                 "re-export the movie or use an image sequence.") from None

    @staticmethod
    def _to_array(av_frame) -> np.ndarray:
        deep = max(c.bits for c in av_frame.format.components) > 8
        return av_frame.to_ndarray(format="rgb48le" if deep else "rgb24")

    def _remember(self, index: int, pixels: np.ndarray) -> None:
        self._cache[index] = pixels
        while len(self._cache) > 1 and sum(p.nbytes for p in self._cache.values()) > _CACHE_BYTES:
            self._cache.popitem(last=False)


def write_movie(path: str | os.PathLike, frames: Iterable[np.ndarray], *, fps: int = 24) -> tuple[Path, str]:
    """Encode (H, W, 3) uint8 frames: H.264 when this PyAV build has an encoder for it, else MPEG-4 Part 2.

    Returns the path and the codec used. Odd sizes are cropped by one pixel (4:2:0 video needs even sizes).
    """
    av = _pyav()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = next((name for name in ("libx264", "h264", "mpeg4") if _can_encode(name)), None)
    if codec is None:
        raise OAVMInputError("this PyAV build has neither an H.264 nor an MPEG-4 encoder; reinstall 'av'.")
    container = av.open(str(path), "w")
    try:
        stream = None
        for pixels in frames:
            pixels = np.ascontiguousarray(pixels[: pixels.shape[0] // 2 * 2, : pixels.shape[1] // 2 * 2, :3])
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = pixels.shape[:2]
                stream.pix_fmt = "yuv420p"
                if codec == "mpeg4":
                    stream.bit_rate = 8_000_000
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    finally:
        container.close()
    return path, codec


def _can_encode(name: str) -> bool:
    try:
        return _pyav().codec.Codec(name, "w").type == "video"
    except Exception:  # not built into this FFmpeg
        return False
