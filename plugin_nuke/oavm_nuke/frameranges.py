# SPDX-License-Identifier: GPL-3.0-or-later
"""Frame ranges in Nuke's syntax, as ``nuke.FrameRange`` / ``nuke.FrameRanges`` read them.

Nuke's documented forms ("Defining Frame Ranges" in the Nuke user guide): ``3``, ``-3``, ``1-10``, ``-3-4``,
``-8--5``, ``1-10x2`` (1, 3, 5, 7, 9), ``1-10x3`` (1, 4, 7, 10) and several ranges separated by spaces
(``1-4x1 8-10 12-14``). Commas are accepted as separators too. A range whose first frame is larger than its last
runs backwards (``100-1`` is 100, 99, ... 1), which is how an artist analyses backwards from a keyed last frame.

Implemented here without ``nuke`` so that the farm command, the tests and the gizmo all parse a range the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, List, Sequence

# first, optional "-last", optional "x step"; negative numbers allowed on both ends ("-8--5").
_RANGE = re.compile(r"^(-?\d+)(?:-(-?\d+))?(?:[xX](\d+))?$")


class FrameRangeError(ValueError):
    """A frame range that Nuke would not read; the message shows the accepted forms."""


_HELP = "use Nuke's frame range syntax, e.g. '1001-1100', '1-100x2' or '1-10 20-30'"


@dataclass(frozen=True)
class FrameRange:
    """One ``first-last xstep`` range, like ``nuke.FrameRange``: ``step`` is always positive; the direction comes
    from ``first`` and ``last``."""
    first: int
    last: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.step < 1:
            raise FrameRangeError("a frame step must be 1 or more, got %d; %s" % (self.step, _HELP))

    @property
    def increment(self) -> int:
        """The signed step between frames (``nuke.FrameRange.increment()``)."""
        return self.step if self.last >= self.first else -self.step

    def frames(self) -> List[int]:
        inc = self.increment
        return list(range(self.first, self.last + (1 if inc > 0 else -1), inc))

    def __iter__(self) -> Iterator[int]:
        return iter(self.frames())

    def __len__(self) -> int:
        return len(self.frames())

    def __str__(self) -> str:
        if self.first == self.last:
            return str(self.first)
        text = "%d-%d" % (self.first, self.last)
        return text if self.step == 1 else "%sx%d" % (text, self.step)


@dataclass(frozen=True)
class FrameRanges:
    """Several ranges, in the order given; ``frames()`` is the order in which the gizmo analyses them."""
    ranges: tuple

    def frames(self) -> List[int]:
        return [f for r in self.ranges for f in r.frames()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.frames())

    def __len__(self) -> int:
        return len(self.frames())

    def __str__(self) -> str:
        return " ".join(str(r) for r in self.ranges)

    @property
    def min_frame(self) -> int:
        return min(self.frames())

    @property
    def max_frame(self) -> int:
        return max(self.frames())


def parse_frame_range(text: str) -> FrameRange:
    """One range such as ``1-100x2`` or ``-8--5``."""
    m = _RANGE.match(text.strip())
    if not m:
        raise FrameRangeError("cannot read the frame range %r; %s" % (text, _HELP))
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    step = int(m.group(3)) if m.group(3) is not None else 1
    return FrameRange(first, last, step)


def parse_frame_ranges(text: str) -> FrameRanges:
    """Ranges separated by spaces or commas. Every frame may appear once: the model sees them as one sequence."""
    parts = [p for p in re.split(r"[\s,]+", (text or "").strip()) if p]
    if not parts:
        raise FrameRangeError("the frame range is empty; %s" % _HELP)
    ranges = FrameRanges(tuple(parse_frame_range(p) for p in parts))
    seen = set()
    for frame in ranges.frames():
        if frame in seen:
            raise FrameRangeError("frame %d appears twice in %r; every frame can be analysed once per run, "
                                  "so make the ranges not overlap" % (frame, text))
        seen.add(frame)
    return ranges


def compact(frames: Sequence[int]) -> FrameRanges:
    """The fewest ``first-last xstep`` ranges that list ``frames`` in order (used to render only the frames that
    are needed, one ``nuke.execute`` per range, and to name frames in messages)."""
    frames = list(frames)
    out, i = [], 0
    while i < len(frames):
        j = i + 1
        if j < len(frames):
            step = frames[j] - frames[i]
            while j < len(frames) and frames[j] - frames[j - 1] == step:
                j += 1
            if step == 0 or (abs(step) > 1 and j - i < 3):   # a lone jump reads better as single frames
                j = i + 1
        step = abs(frames[i + 1] - frames[i]) if j - i > 1 else 1
        out.append(FrameRange(frames[i], frames[j - 1], step))
        i = j
    return FrameRanges(tuple(out))
