# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading plates and writing matte EXRs with OpenImageIO, which Blender bundles (``import OpenImageIO``).

OpenImageIO is used instead of ``bpy.data.images`` because it is thread-safe: the worker thread reads the next
frame and writes the last matte while Blender's UI stays responsive (``bpy`` may only be touched from the main
thread).

Plates go to the service display-referred, as the network was trained (OAVM starts from RVM, trained on 8-bit
video): integer files (PNG, JPEG, DPX, 16-bit TIFF) as they are, float files (EXR) encoded with the sRGB curve
first, unless the artist says otherwise. Mattes are coverage, not colour, and are written unchanged: one EXR
layer per object, channel ``<object>.A``, which Blender's Image node shows as one output socket per object.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import SourceError
from .service import shared_module

try:
    import OpenImageIO as oiio
except ImportError:  # pragma: no cover - Blender 4.2+ and the test environment both ship it
    oiio = None

COLORSPACES = ("auto", "display", "linear")   # auto: float files are linear, integer files display-referred
_INTEGER_TYPES = ("uint8", "uint16")          # sent as they are (the wire carries them)
_FLOAT_TYPES = ("half", "float", "double")
_AS_STORED = _INTEGER_TYPES + ("half",)       # read in their own type; other types as float


def _oiio():
    if oiio is None:
        raise SourceError("OpenImageIO is not available in this Python; use Blender 4.2 or later, which bundles it")
    return oiio


def _open(path: str | os.PathLike):
    lib = _oiio()
    inp = lib.ImageInput.open(os.fspath(path))
    if inp is None:
        problem = lib.geterror() or "unreadable"
        hint = ("check the path, or re-link the file (File > External Data > Find Missing Files)"
                if not os.path.exists(path) else "re-export the file as PNG, TIFF or EXR")
        raise SourceError(f"cannot read {os.fspath(path)}: {problem}; {hint}")
    return inp


def _read(path: str | os.PathLike, pixel_type: str | None = None) -> tuple[np.ndarray, str]:
    """(H, W, C) pixels and the file's pixel type name: as ``pixel_type``, or when None as stored for integer and
    half files (what read_frame converts fastest), else as float."""
    inp = _open(path)
    try:
        file_type = str(inp.spec().format)
        pixels = inp.read_image(pixel_type or (file_type if file_type in _AS_STORED else "float"))
        if pixels is None:
            raise SourceError(f"cannot read the pixels of {os.fspath(path)}: {inp.geterror()}; the file may be "
                              f"truncated, render or export it again")
    finally:
        inp.close()
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return pixels, file_type


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, from its header only."""
    inp = _open(path)
    try:
        spec = inp.spec()
        return spec.width, spec.height
    finally:
        inp.close()


def read_frame(path: str | os.PathLike, colorspace: str = "auto") -> np.ndarray:
    """(H, W, 3) display-referred RGB: uint8/uint16 straight from integer files, else float32 in [0, 1] (the
    service's own conversion, ``shared/colour.py``; a half-float EXR is read as half and converted through its
    table of every half value: 1080p plates in 0.3x the time of the float path)."""
    if colorspace not in COLORSPACES:
        raise SourceError(f"unknown plate colour space {colorspace!r}: use one of {', '.join(COLORSPACES)}")
    pixels, file_type = _read(path)
    rgb = pixels[..., :3] if pixels.shape[2] >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    is_integer = file_type not in _FLOAT_TYPES
    linear = colorspace == "linear" or (colorspace == "auto" and not is_integer)
    if is_integer and not linear:
        return np.ascontiguousarray(rgb)
    if is_integer:
        rgb = rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
    return shared_module().colour.display_frame(rgb, linear)


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """(H, W, C) float32 pixels as stored (integer files scaled to [0, 1]); for mask images."""
    return _read(path, "float")[0].astype(np.float32)


def write_matte_exr(path: str | os.PathLike, layers: Mapping[str, np.ndarray], *, half: bool = True) -> Path:
    """Write ``{object id: (H, W) alpha}`` as one EXR with channel ``<object>.A`` per object, atomically.

    The bytes go to a temporary name in the same folder and are renamed over ``path`` only when complete, so a
    cancelled or failed job never leaves a half-written matte that the compositor would read.
    """
    lib = _oiio()
    path = Path(path)
    names = list(layers)
    if not names:
        raise ValueError("no matte layers to write")
    stack = np.stack([np.asarray(layers[name], dtype=np.float32) for name in names], axis=-1)
    height, width = stack.shape[:2]
    spec = lib.ImageSpec(width, height, len(names), lib.HALF if half else lib.FLOAT)
    spec.channelnames = tuple(f"{name}.A" for name in names)
    spec.attribute("compression", "zip")
    spec.attribute("Software", "OAVM Blender add-on")
    path.parent.mkdir(parents=True, exist_ok=True)
    files = shared_module().files
    tmp = files.temporary_path(path)
    out = lib.ImageOutput.create(str(path))          # the EXR writer is chosen by the real name...
    try:
        if out is None or not out.open(str(tmp), spec):   # ...while the bytes go to the temporary one
            problem = out.geterror() if out is not None else lib.geterror()
            raise SourceError(f"cannot write {path}: {problem}; check that the output folder is writable")
        ok = out.write_image(np.ascontiguousarray(stack))
        ok = out.close() and ok
        if not ok:
            raise SourceError(f"writing {path} failed: {out.geterror()}; check the free disk space")
        os.replace(tmp, path)
    finally:
        files.remove_quietly(tmp)       # gone already once renamed; a failed write's partial file
    return path


def read_matte_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{object id: (H, W) float32 alpha}`` from a matte written by write_matte_exr."""
    inp = _open(path)
    try:
        names = list(inp.spec().channelnames)
        pixels = inp.read_image("float")
    finally:
        inp.close()
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return {name[:-2]: np.array(pixels[..., i], dtype=np.float32)
            for i, name in enumerate(names) if name.endswith(".A")}


def colorspace_from_blender(name: str) -> str:
    """Map a datablock's colour space (``colorspace_settings.name``) to how its plates are sent.

    Blender's linear spaces (Linear Rec.709, ACEScg, ...) are scene-linear; sRGB-like display spaces are sent as
    they are; anything else (e.g. Non-Color) is decided per file by ``auto``.
    """
    lowered = name.lower()
    if "linear" in lowered or "acescg" in lowered or "aces2065" in lowered:
        return "linear"
    if any(key in lowered for key in ("srgb", "rec.1886", "gamma", "display p3", "bt.1886")):
        return "display"
    return "auto"
