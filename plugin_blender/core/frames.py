# SPDX-License-Identifier: GPL-3.0-or-later
"""Frame ranges and image-sequence file names, following Blender's own rules.

Blender numbers a sequence by the *last* run of digits in the file name (``plate_0001.png``, ``shot.1001.exr``)
and maps a scene frame to a file number linearly (Movie Clip: ``frame_start``/``frame_offset``; Image user:
``frame_start``/``frame_offset``). :class:`FrameMap` is that mapping, :class:`SequenceFiles` the file names.
Mattes are always numbered by *scene* frame, so the node group can read them back with a plain offset.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import FrameRangeError, SourceError

_LAST_DIGITS = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class FrameRange:
    """An inclusive range of scene frames ``start..end``, processed in that order."""
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise FrameRangeError(f"the frame range {self.start}-{self.end} is reversed: set the end frame to "
                                  f"{self.start} or later")

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __contains__(self, frame: object) -> bool:
        return isinstance(frame, int) and self.start <= frame <= self.end

    def frames(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    def check_within(self, available: "FrameRange", what: str) -> None:
        """Refuse frames the source does not have, naming the range it does have."""
        if self.start < available.start or self.end > available.end:
            raise FrameRangeError(f"frames {self} reach outside {what}, which covers scene frames {available}: "
                                  f"set the frame range within {available}")


@dataclass(frozen=True)
class FrameMap:
    """scene frame -> source frame number: ``source_start + (scene_frame - scene_start)``."""
    scene_start: int
    source_start: int

    def source_frame(self, scene_frame: int) -> int:
        return self.source_start + (scene_frame - self.scene_start)

    def scene_frame(self, source_frame: int) -> int:
        return self.scene_start + (source_frame - self.source_start)

    @classmethod
    def blender_image_user(cls, frame_start: int, frame_offset: int) -> "FrameMap":
        """An Image node / image user: scene frame ``frame_start`` shows file number ``1 + frame_offset``."""
        return cls(frame_start, 1 + frame_offset)

    @classmethod
    def blender_movie_clip(cls, frame_start: int, frame_offset: int, first_number: int) -> "FrameMap":
        """A Movie Clip: scene frame ``frame_start`` shows its first file (``first_number``) + ``frame_offset``."""
        return cls(frame_start, first_number + frame_offset)


@dataclass(frozen=True)
class SequenceFiles:
    """An image sequence named like ``<head><number><tail>``, with at least ``digits`` digits of zero padding."""
    head: str
    tail: str
    digits: int

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "SequenceFiles":
        """Split a file of the sequence (e.g. ``/plates/shot_0001.png``) at the last number of its *name*."""
        path = os.fspath(path)
        folder, name = os.path.split(path)
        match = _LAST_DIGITS.search(name)
        if match is None:
            raise SourceError(f"{path} has no frame number in its name, so it is not an image sequence: "
                              f"name the frames like shot_0001.png, shot_0002.png, ...")
        head = os.path.join(folder, name[:match.start()])
        return cls(head, name[match.end():], len(match.group(1)))

    @staticmethod
    def number_of(path: str | os.PathLike) -> int:
        """The frame number of one file of a sequence (the last number in its name)."""
        SequenceFiles.from_path(path)   # the same error for a name without a number
        return int(_LAST_DIGITS.search(os.path.basename(os.fspath(path))).group(1))

    def path(self, number: int) -> str:
        sign = "-" if number < 0 else ""
        return f"{self.head}{sign}{abs(number):0{self.digits}d}{self.tail}"

    def existing_numbers(self) -> list[int]:
        """The frame numbers of the files of this sequence that exist, ascending."""
        folder, prefix = os.path.split(self.head)
        folder = folder or "."
        pattern = re.compile(re.escape(prefix) + r"(-?\d+)" + re.escape(self.tail) + r"$")
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        return sorted({int(m.group(1)) for m in map(pattern.match, names) if m})

    def available_range(self, frame_map: FrameMap, what: str) -> FrameRange:
        """The scene frames from the sequence's first to its last existing file."""
        numbers = self.existing_numbers()
        if not numbers:
            raise SourceError(f"no file of {what} exists ({self.path(1)!r} and siblings): check the path, or "
                              f"re-link the missing files (File > External Data > Find Missing Files)")
        return FrameRange(frame_map.scene_frame(numbers[0]), frame_map.scene_frame(numbers[-1]))

    def paths_for(self, frames: FrameRange, frame_map: FrameMap, what: str) -> dict[int, str]:
        """``{scene frame: file}`` for ``frames``; a missing file (a gap in the sequence) is refused up front."""
        paths = {f: self.path(frame_map.source_frame(f)) for f in frames.frames()}
        missing = [f for f, path in paths.items() if not os.path.isfile(path)]
        if missing:
            raise SourceError(f"{what} has no file for scene frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                              f"(e.g. {paths[missing[0]]}): restore the files, or matte a range without the gap")
        return paths


def matte_files(folder: str | os.PathLike) -> SequenceFiles:
    """The matte sequence of a clip: ``<folder>/matte.####.exr``, numbered by scene frame."""
    return SequenceFiles(os.path.join(os.fspath(folder), "matte."), ".exr", 4)
