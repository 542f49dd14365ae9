# SPDX-License-Identifier: GPL-3.0-or-later
"""Frame-number patterns (``####``, ``%04d``, ``@``) and render-farm frame-range syntax (``1-100x2``, ``1,5,10-20``).

Compositing packages and farm managers disagree on how a frame number sits in a file name, so every spelling an
artist is likely to paste is accepted and turned into one :class:`FramePattern`:

* ``plate.####.exr`` - each ``#`` is one digit of zero padding (Nuke, Deadline): frame 1001 -> ``plate.1001.exr``;
* ``plate.@@@@.exr`` - each ``@`` is one digit as well (Shake, Katana);
* ``plate.%04d.exr`` / ``plate.%d.exr`` - printf style (Nuke, ffmpeg, Blender's ``bpy`` paths).

A frame number longer than the padding is written in full (``#`` with 12345 -> ``12345``), as every host does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from oavm_service.errors import OAVMInputError

# One frame token in a path: a run of '#', a run of '@', or a printf integer conversion.
_TOKEN = re.compile(r"(#+|@+|%0?(\d*)d)")


@dataclass(frozen=True)
class FramePattern:
    """A path with (at most) one frame-number token; ``padding`` 0 means "no zero padding"."""

    head: str
    tail: str
    padding: int
    is_sequence: bool
    text: str

    @classmethod
    def parse(cls, text: str | os.PathLike) -> "FramePattern":
        text = os.fspath(text)
        name = os.path.basename(text)
        tokens = list(_TOKEN.finditer(name))
        if not tokens:
            return cls(text, "", 0, False, text)
        if len(tokens) > 1:
            raise OAVMInputError(
                f"{text!r} has {len(tokens)} frame-number tokens ({', '.join(t.group(0) for t in tokens)}); "
                "write exactly one, e.g. 'plate.####.exr' or 'plate.%04d.exr'.")
        tok = tokens[0]
        start = len(text) - len(name) + tok.start()
        end = len(text) - len(name) + tok.end()
        if tok.group(0).startswith("%"):
            padding = int(tok.group(2) or 0)
        else:
            padding = len(tok.group(0))
        return cls(text[:start], text[end:], padding, True, text)

    def path(self, frame: int) -> Path:
        """The file of ``frame`` (a single image's own path when this is no sequence)."""
        if not self.is_sequence:
            return Path(self.head)
        digits = f"{abs(frame):0{self.padding}d}" if self.padding else str(abs(frame))
        return Path(f"{self.head}{'-' if frame < 0 else ''}{digits}{self.tail}")

    def frame_of(self, path: str | os.PathLike) -> int | None:
        """The frame number a file name stands for, or None when it does not match this pattern."""
        if not self.is_sequence:
            return None
        name = os.path.basename(os.fspath(path))
        head, tail = os.path.split(self.head)[1], self.tail
        digits = r"-?\d{%d,}" % max(self.padding, 1)
        m = re.fullmatch(re.escape(head) + f"({digits})" + re.escape(tail), name)
        if m is None:
            return None
        frame = int(m.group(1))
        # A padded pattern names each frame once: 'plate.0001.exr' is frame 1 for '####' but '001' is not.
        return frame if self.path(frame).name == name else None

    def existing_frames(self) -> list[int]:
        """The frame numbers present on disk, sorted (what ``--frames`` defaults to for a sequence)."""
        if not self.is_sequence:
            return []
        folder = Path(os.path.split(self.head)[0] or ".")
        if not folder.is_dir():
            return []
        frames = (self.frame_of(entry.name) for entry in os.scandir(folder) if entry.is_file())
        return sorted(f for f in frames if f is not None)

    def __str__(self) -> str:
        return self.text


def is_pattern(text: str | os.PathLike) -> bool:
    """True when ``text`` names a frame sequence rather than one file."""
    return FramePattern.parse(text).is_sequence


_RANGE_ITEM = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*(?:[x:]\s*(\d+)\s*)?)?$")


def parse_frame_range(text: str) -> list[int]:
    """Expand farm frame syntax into the list of frames, in the order given, without duplicates.

    ``1-100`` (inclusive), ``1-100x2`` or ``1-100:2`` (every 2nd frame), ``1,5,10-20`` (lists), ``100-1`` (a
    descending range), negative frames (``-10--1``). A farm hands each task its chunk in this syntax and the batch
    command trusts that list: it mattes exactly these frames.
    """
    if not isinstance(text, str) or not text.strip():
        raise OAVMInputError("empty frame range; write e.g. '1001-1100', '1-100x2' or '1,5,10-20'.")
    frames: list[int] = []
    seen: set[int] = set()
    # Items are separated by commas or spaces; spaces inside an item ("1 - 100 x 2") are tolerated.
    compact = re.sub(r"\s*([x:])\s*", r"\1", re.sub(r"(\d)\s*-\s*", r"\1-", text.strip()))
    for item in re.split(r"[,\s]+", compact):
        if not item:
            continue
        m = _RANGE_ITEM.match(item)
        if m is None:
            raise OAVMInputError(
                f"cannot read frame range item {item!r} in {text!r}; write 'START-END', 'START-ENDxSTEP' or "
                "single frames separated by commas, e.g. '1001-1100', '1-100x2', '1,5,10-20'.")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) else 1
        if step < 1:
            raise OAVMInputError(f"frame step must be 1 or more in {item!r}.")
        direction = 1 if end >= start else -1
        for frame in range(start, end + direction, step * direction):
            if frame not in seen:
                seen.add(frame)
                frames.append(frame)
    if not frames:
        raise OAVMInputError(f"frame range {text!r} names no frames; write e.g. '1001-1100'.")
    return frames


def format_frame_range(frames: list[int]) -> str:
    """The shortest farm syntax for a sorted frame list (for log lines and job scripts): [1,2,3,7] -> '1-3,7'."""
    out: list[str] = []
    i = 0
    frames = sorted(set(frames))
    while i < len(frames):
        j = i
        step = frames[i + 1] - frames[i] if i + 1 < len(frames) else 1
        while j + 1 < len(frames) and frames[j + 1] - frames[j] == step:
            j += 1
        if j - i >= 2 or (j > i and step == 1):
            out.append(f"{frames[i]}-{frames[j]}" + (f"x{step}" if step != 1 else ""))
            i = j + 1
        else:
            out.append(str(frames[i]))
            i += 1
    return ",".join(out)
