# SPDX-License-Identifier: GPL-3.0-or-later
"""Image/movie I/O for the batch command and the demo: one :class:`FrameSource` over sequences, stills and movies.

The parts: :mod:`.images` (OpenImageIO), :mod:`.movies` (PyAV), :mod:`.colour` (sRGB <-> linear),
:mod:`.sequences` (frame patterns and farm frame ranges).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oavm_service.errors import OAVMInputError
from oavm_service.io.colour import InputColorspace, to_network_rgb
from oavm_service.io.images import Image, ImageHeader, Window, read_header, read_image
from oavm_service.io.movies import MovieReader, is_movie
from oavm_service.io.sequences import FramePattern, parse_frame_range

__all__ = ["FrameSource", "Plate", "parse_frame_range", "FramePattern", "InputColorspace"]


@dataclass
class Plate:
    """One input frame: its own pixels (for ``--output-mode rgba``) and the network's display-referred view."""

    frame: int
    source: str                 # the file (or "movie.mov@frame") it came from, for messages and metadata
    header: ImageHeader         # windows and channels; a movie frame gets a full-frame header
    rgb: np.ndarray             # (H, W, 3) float32 as stored (linear for a linear EXR)
    network_rgb: np.ndarray     # (H, W, 3) float32 in [0, 1], display-referred: what ClipSession.step() gets


class FrameSource:
    """Frames by number from an image sequence, a single image or a movie."""

    def __init__(self, spec: str | os.PathLike, *, first_frame: int = 0,
                 colorspace: InputColorspace = InputColorspace.AUTO) -> None:
        self.spec = os.fspath(spec)
        self.colorspace = colorspace
        self.pattern = FramePattern.parse(self.spec)
        self.movie = MovieReader(self.spec, first_frame=first_frame) if is_movie(self.spec) else None
        self.first_frame = first_frame
        if self.movie is not None and colorspace is InputColorspace.LINEAR:
            raise OAVMInputError("movies are display-referred video; drop --input-colorspace linear for them.")
        if self.movie is None and not self.pattern.is_sequence and not Path(self.spec).exists():
            raise OAVMInputError(f"{self.spec} does not exist. For a sequence write the frame number as #### "
                                 "(e.g. plate.####.exr), %04d or @@@@.")

    @property
    def kind(self) -> str:
        return "movie" if self.movie else "sequence" if self.pattern.is_sequence else "image"

    def available_frames(self) -> list[int]:
        """The frames there are: a movie's frames, a sequence's frames on disk, a still's one frame."""
        if self.movie is not None:
            return self.movie.frames()
        if self.pattern.is_sequence:
            return self.pattern.existing_frames()
        return [self.first_frame]

    def path_of(self, frame: int) -> str:
        if self.movie is not None:
            return f"{self.spec}@{frame}"
        return str(self.pattern.path(frame))

    def missing(self, frames: list[int]) -> list[int]:
        """Frames of ``frames`` that are not there (checked before any work starts)."""
        if self.movie is not None:
            have = set(self.movie.frames())
            return [f for f in frames if f not in have]
        if not self.pattern.is_sequence:
            return []
        return [f for f in frames if not self.pattern.path(f).is_file()]

    def header(self, frame: int) -> ImageHeader:
        """A frame's header without its pixels (a movie frame: the full frame, no metadata)."""
        if self.movie is not None:
            window = Window(0, 0, self.movie.width, self.movie.height)
            return ImageHeader(Path(self.spec), ("R", "G", "B"), window, window, "uint8")
        return read_header(self.pattern.path(frame))

    def read(self, frame: int) -> Plate:
        if self.movie is not None:
            rgb = self.movie.read(frame)
            return Plate(frame, self.path_of(frame), self.header(frame), rgb,
                         to_network_rgb(rgb, InputColorspace.DISPLAY))
        image: Image = read_image(self.pattern.path(frame))
        rgb = image.rgb()
        header = ImageHeader(image.path, image.channels, image.data_window, image.display_window,
                             image.pixel_type, image.attributes)
        return Plate(frame, str(image.path), header, rgb, image.network_rgb(self.colorspace, rgb))

    def close(self) -> None:
        if self.movie is not None:
            self.movie.close()
