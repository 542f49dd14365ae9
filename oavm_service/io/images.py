# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading plates and masks, writing mattes: OpenImageIO for EXR, DPX, TIFF, PNG and JPEG.

Things compositors rely on and this module keeps:

* the data window (a CG render's bounding box) and the display window of the input are written back unchanged,
  so a matte lines up with its plate in Nuke without a Reformat;
* EXR channels are named ``layer.channel`` (``hero.A``, ``hero.fgmask``), which Nuke and Blender show as layers;
* every file is written under a temporary name in its own folder and renamed into place, so a farm job killed
  mid-write never leaves a half-written frame behind;
* palette PNG masks (DAVIS/YouTube-VOS style, index = object id) are read by index, not by colour.

OpenImageIO's Python ``write_image`` takes (H, W, C) arrays; a 2-D array is silently scrambled, so every array
that reaches it goes through :func:`_as_hwc`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import OpenImageIO as oiio

from oavm_service.errors import OAVMInputError
from oavm_service.io.colour import InputColorspace, resolve_colorspace, to_network_rgb
from shared.files import remove_quietly, temporary_path

# Rec.709 luma weights: how a colour mask image becomes one coverage value per pixel.
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)

# Output pixel types per file extension: EXR half float; 16-bit integers for pipelines without EXR.
_OUTPUT_TYPES = {".exr": oiio.HALF, ".png": oiio.UINT16, ".tif": oiio.UINT16, ".tiff": oiio.UINT16}
_FLOAT_TYPES = {"half", "float", "double"}


@dataclass(frozen=True)
class Window:
    """A pixel rectangle in image coordinates (OpenEXR's data or display window, y down)."""

    x: int
    y: int
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __str__(self) -> str:
        return f"{self.width}x{self.height}+{self.x}+{self.y}"


@dataclass
class ImageHeader:
    """What a file says about itself, without its pixels."""

    path: Path
    channels: tuple[str, ...]
    data_window: Window
    display_window: Window
    pixel_type: str                       # "half", "float", "uint8", "uint16", ...
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        return self.pixel_type in _FLOAT_TYPES


@dataclass
class Image(ImageHeader):
    """An image's data window as (H, W, C) float32 (integer files scaled to 0..1)."""

    pixels: np.ndarray = None  # type: ignore[assignment]

    def channel(self, name: str) -> np.ndarray:
        """One channel as (H, W) float32; the error lists the channels there are."""
        if name not in self.channels:
            raise OAVMInputError(
                f"{self.path} has no channel {name!r}; its channels are {', '.join(self.channels)}. "
                "Pass one of these (e.g. --mask-channel) or use another file.")
        return self.pixels[..., self.channels.index(name)]

    def network_rgb(self, colorspace: InputColorspace = InputColorspace.AUTO, rgb: np.ndarray | None = None
                    ) -> np.ndarray:
        """What the engine gets: :func:`~oavm_service.io.colour.to_network_rgb` of :meth:`rgb` (or of ``rgb`` when
        the caller has it already), ``auto`` resolved by the pixel type. A half-float file's values are exactly
        float16, so they go through the table of every half value: the same numbers, 2.5x faster with the cast."""
        rgb = self.rgb() if rgb is None else rgb
        space = resolve_colorspace(colorspace, is_float=self.is_float)
        return to_network_rgb(rgb.astype(np.float16) if self.pixel_type == "half" else rgb, space)

    def rgb(self) -> np.ndarray:
        """The colour channels as (H, W, 3): R, G, B by name, else the first three, a grey image repeated."""
        names = self.channels
        if all(c in names for c in "RGB"):
            return self.pixels[..., [names.index(c) for c in "RGB"]]
        colour = [i for i, c in enumerate(names) if c not in ("A", "Z") and "." not in c]
        if len(colour) >= 3:
            return self.pixels[..., colour[:3]]
        if len(colour) >= 1:
            return np.repeat(self.pixels[..., colour[:1]], 3, axis=-1)
        raise OAVMInputError(
            f"{self.path} has no colour channels (channels: {', '.join(names)}); give a plate with R, G, B.")

    def alpha(self) -> np.ndarray | None:
        return self.channel("A") if "A" in self.channels else None


# --------------------------------------------------------------------------------------------------- reading


def _open(path: Path) -> "oiio.ImageInput":
    if not path.exists():
        raise OAVMInputError(f"{path} does not exist; check the path and the frame number.")
    # Values as stored: without this hint PNG/TIFF readers premultiply colour by an unassociated alpha.
    config = oiio.ImageSpec()
    config.attribute("oiio:UnassociatedAlpha", 1)
    inp = oiio.ImageInput.open(str(path), config)
    if inp is None:
        raise OAVMInputError(f"cannot read {path}: {oiio.geterror() or 'unknown format'}. "
                             "Re-render or replace this file.")
    return inp


def _header(path: Path, spec: "oiio.ImageSpec") -> ImageHeader:
    attributes = {p.name: p.value for p in spec.extra_attribs if not p.name.startswith("ICCProfile")}
    return ImageHeader(
        path=path,
        channels=tuple(spec.channelnames),
        data_window=Window(spec.x, spec.y, spec.width, spec.height),
        display_window=Window(spec.full_x, spec.full_y, spec.full_width, spec.full_height),
        pixel_type=str(spec.format),
        attributes=attributes,
    )


def read_header(path: str | os.PathLike) -> ImageHeader:
    """The header of an image file (channels, windows, pixel type, metadata) without reading pixels."""
    path = Path(path)
    inp = _open(path)
    try:
        return _header(path, inp.spec())
    finally:
        inp.close()


def read_image(path: str | os.PathLike, *, subimage: int = 0) -> Image:
    """Read one image (one EXR part) completely; a truncated or corrupt file raises OAVMInputError naming it."""
    path = Path(path)
    inp = _open(path)
    try:
        if subimage and not inp.seek_subimage(subimage, 0):
            raise OAVMInputError(f"{path} has no part {subimage}.")
        spec = inp.spec()
        pixels = inp.read_image(format=oiio.FLOAT)
        # Some readers return pixels *and* an error (a JPEG cut short is padded with grey): both mean corrupt.
        if pixels is None or inp.has_error:
            raise OAVMInputError(f"{path} is corrupt or truncated ({inp.geterror() or 'no pixels'}); "
                                 "re-render or replace this frame, then run the same command again.")
        header = _header(path, spec)
    finally:
        inp.close()
    pixels = np.asarray(pixels, dtype=np.float32).reshape(spec.height, spec.width, spec.nchannels)
    return Image(**vars(header), pixels=pixels)


def find_channel(path: str | os.PathLike, name: str) -> tuple[Image, np.ndarray]:
    """Channel ``name`` from whichever part of a (multi-part) EXR holds it."""
    path = Path(path)
    inp = _open(path)
    try:
        parts = []
        index = 0
        while inp.seek_subimage(index, 0):
            parts.append(tuple(inp.spec().channelnames))
            index += 1
    finally:
        inp.close()
    for index, channels in enumerate(parts):
        if name in channels:
            image = read_image(path, subimage=index)
            return image, image.channel(name)
    found = ", ".join(c for part in parts for c in part)
    raise OAVMInputError(f"{path} has no channel {name!r}; its channels are {found}. "
                         "Pass one of these with --mask-channel.")


def palette_indices(path: str | os.PathLike) -> np.ndarray | None:
    """(H, W) palette indices of an indexed-colour PNG, or None when the file is not one.

    OpenImageIO expands palettes to RGB, so the indices are recovered from the PNG's own PLTE chunk: each pixel's
    colour is looked up in the palette (mask palettes such as DAVIS's hold every colour once).
    """
    path = Path(path)
    palette = _png_palette(path)
    if palette is None:
        return None
    inp = _open(path)
    try:
        rgb = inp.read_image(format=oiio.UINT8)
        failed = rgb is None or inp.has_error
        error = inp.geterror()
    finally:
        inp.close()
    if failed:
        raise OAVMInputError(f"{path} is corrupt or truncated ({error}); replace the mask file.")
    rgb = np.asarray(rgb)[..., :3].astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    first = {int(k): i for i, k in reversed(list(enumerate(keys)))}     # first palette entry of each colour wins
    lut_keys = np.array(sorted(first), dtype=np.int64)
    lut_vals = np.array([first[int(k)] for k in lut_keys], dtype=np.int32)
    pos = np.clip(np.searchsorted(lut_keys, codes), 0, len(lut_keys) - 1)
    if not np.array_equal(lut_keys[pos], codes):
        raise OAVMInputError(f"{path} has colours that are not in its palette; save it again as an indexed PNG.")
    return lut_vals[pos]


def _png_palette(path: Path) -> np.ndarray | None:
    """The PLTE chunk of a colour-type-3 PNG as (N, 3) int32, else None (not a PNG, or not indexed)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        indexed = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            data = f.read(length)
            f.read(4)  # CRC
            if kind == b"IHDR":
                indexed = len(data) >= 10 and data[9] == 3
                if not indexed:
                    return None
            elif kind == b"PLTE" and indexed:
                return np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            elif kind in (b"IDAT", b"IEND"):
                return None


def read_mask(path: str | os.PathLike, *, channel: str | None = None, index: int | None = None
              ) -> tuple[Image, np.ndarray]:
    """A mask file as (header, (H, W) float32 coverage in [0, 1]).

    Which pixels are "the object", in order of precedence:
    ``channel`` (a named channel, e.g. ``hero.A`` of an EXR) > ``index`` (palette PNG or integer id image) >
    a palette PNG's single non-zero index > the alpha channel (unless it is all opaque) > luminance.
    """
    path = Path(path)
    if channel is not None:
        image, values = find_channel(path, channel)
        return image, _coverage(values)
    indices = palette_indices(path) if path.suffix.lower() == ".png" else None
    image = read_image(path)
    if indices is None and index is not None:
        indices = _integer_ids(image)
    if indices is not None:
        if index is None:
            ids = sorted(int(i) for i in np.unique(indices) if i != 0)
            if len(ids) > 1:
                raise OAVMInputError(
                    f"{path} holds several objects (indices {', '.join(map(str, ids))}); "
                    "say which one with --mask-index N (or NAME=[FRAME=]PATH:N for --object).")
            return image, (indices != 0).astype(np.float32)
        return image, (indices == index).astype(np.float32)
    alpha = image.alpha()
    if alpha is not None and (float(alpha.min()) < 1.0 or len(image.channels) == 1):
        return image, _coverage(alpha)
    return image, _coverage(image.rgb() @ LUMA_WEIGHTS)     # a grey image is repeated, so its luma is itself


def _integer_ids(image: Image) -> np.ndarray:
    """Object ids stored as grey levels of an 8/16-bit single-channel image (0 = background)."""
    scale = {"uint8": 255, "uint16": 65535}.get(image.pixel_type)
    if scale is None or len(image.channels) != 1:
        raise OAVMInputError(
            f"--mask-index needs a palette PNG or a single-channel 8/16-bit id image; {image.path} is "
            f"{image.pixel_type} with channels {', '.join(image.channels)}. Use --mask-channel or drop --mask-index.")
    return np.rint(image.pixels[..., 0] * scale).astype(np.int32)


def _coverage(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    return np.clip(values, 0.0, 1.0)


def align_to_window(pixels: np.ndarray, source: ImageHeader, target: ImageHeader) -> np.ndarray:
    """``pixels`` (``source``'s data window) re-cut to ``target``'s data window, zeros outside the source.

    A mask painted at full frame must line up with a plate whose data window is a bounding box: both live in the
    same display window, so the mask is cropped/padded by coordinates. Files of different formats cannot be
    lined up and are refused with both sizes named.
    """
    src, dst = source.data_window, target.data_window
    if (src.x, src.y, src.width, src.height) == (dst.x, dst.y, dst.width, dst.height):
        return pixels
    if source.display_window != target.display_window:
        if src.shape == dst.shape:
            return pixels
        raise OAVMInputError(
            f"{source.path} is {src.width}x{src.height} but the plate {target.path} is {dst.width}x{dst.height}; "
            "give a mask at the plate's resolution.")
    out = np.zeros((dst.height, dst.width, *pixels.shape[2:]), dtype=pixels.dtype)
    x0, y0 = max(src.x, dst.x), max(src.y, dst.y)
    x1, y1 = min(src.x + src.width, dst.x + dst.width), min(src.y + src.height, dst.y + dst.height)
    if x1 > x0 and y1 > y0:
        out[y0 - dst.y:y1 - dst.y, x0 - dst.x:x1 - dst.x] = pixels[y0 - src.y:y1 - src.y, x0 - src.x:x1 - src.x]
    return out


# --------------------------------------------------------------------------------------------------- writing


def output_pixel_type(path: str | os.PathLike) -> "oiio.TypeDesc":
    """EXR -> half float; PNG/TIFF -> 16-bit. Anything else is refused (lossy or 8-bit mattes band)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _OUTPUT_TYPES:
        raise OAVMInputError(f"cannot write mattes as {suffix or 'a file without extension'} ({path}); "
                             "use .exr (half float, layers), or .png/.tif (16-bit).")
    return _OUTPUT_TYPES[suffix]


def _as_hwc(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"image pixels must be (H, W) or (H, W, C), got shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


def write_image(path: str | os.PathLike, pixels: np.ndarray, channels: list[str] | tuple[str, ...], *,
                data_window: Window | None = None, display_window: Window | None = None,
                metadata: Mapping[str, Any] | None = None, compression: str = "zip",
                straight_alpha: bool = False) -> Path:
    """Write (H, W, C) pixels atomically: to a temporary name in the same folder, then renamed over ``path``.

    The pixel type follows the extension (:func:`output_pixel_type`); windows default to the pixels' size at
    the origin; ``metadata`` values go into the header (EXR keeps every type, PNG/TIFF keep strings).
    ``straight_alpha`` says colour is not premultiplied by "A"; otherwise PNG, whose alpha is straight by
    definition, gets the colour un-premultiplied on the way out.
    """
    path = Path(path)
    pixels = _as_hwc(pixels)
    height, width, nchannels = pixels.shape
    if len(channels) != nchannels:
        raise ValueError(f"{nchannels} channels of pixels but {len(channels)} names: {channels}")
    data_window = data_window or Window(0, 0, width, height)
    display_window = display_window or data_window
    if data_window.shape != (height, width):
        raise ValueError(f"data window {data_window} does not match pixels {width}x{height}")
    pixel_type = output_pixel_type(path)

    spec = oiio.ImageSpec(width, height, nchannels, pixel_type)
    spec.channelnames = tuple(channels)
    spec.alpha_channel = list(channels).index("A") if "A" in channels else -1
    spec.x, spec.y = data_window.x, data_window.y
    spec.full_x, spec.full_y = display_window.x, display_window.y
    spec.full_width, spec.full_height = display_window.width, display_window.height
    spec.attribute("compression", compression)
    if straight_alpha:
        spec.attribute("oiio:UnassociatedAlpha", 1)
    for key, value in (metadata or {}).items():
        spec.attribute(key, value)

    return _write_atomically(path, spec, pixels)


def _write_atomically(path: Path, spec: "oiio.ImageSpec", pixels: np.ndarray) -> Path:
    """Write to a temporary name in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    out = oiio.ImageOutput.create(str(path))     # the plug-in is chosen by the real extension...
    if out is None:
        raise OAVMInputError(f"cannot write {path}: {oiio.geterror()}")
    try:
        if not out.open(str(tmp), spec):         # ...while the bytes go to the temporary name
            raise OAVMInputError(f"cannot write {path}: {out.geterror()}; check the folder exists and is writable.")
        ok = out.write_image(pixels)
        ok = out.close() and ok
        if not ok:
            raise OAVMInputError(f"writing {path} failed: {out.geterror()}; check free disk space.")
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)          # gone already once renamed; a failed write's partial file
    return path


def write_8bit(path: str | os.PathLike, pixels: np.ndarray, channels: list[str] | tuple[str, ...], *,
               jpeg_quality: int = 95) -> Path:
    """Write (H, W, C) uint8 pixels as they are to a .jpg or .png (data, e.g. ``oavm pack-data``; not mattes,
    which :func:`write_image` keeps at 16 bits or half float). Atomic like :func:`write_image`."""
    path = Path(path)
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != len(channels):
        raise ValueError(f"write_8bit takes (H, W, {len(channels)}) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        raise OAVMInputError(f"write_8bit writes .jpg or .png, not {path.suffix or 'a file without extension'}")
    spec = oiio.ImageSpec(pixels.shape[1], pixels.shape[0], pixels.shape[2], oiio.UINT8)
    spec.channelnames = tuple(channels)
    if path.suffix.lower() != ".png":
        spec.attribute("Compression", f"jpeg:{int(jpeg_quality)}")
    return _write_atomically(path, spec, pixels)


def verify_image(path: str | os.PathLike, *, channels: tuple[str, ...] | list[str],
                 data_window: Window, display_window: Window | None = None) -> str | None:
    """Why ``path`` is not a complete output with these channels and windows, or None when it is.

    Reads every pixel, so a truncated file is caught, not only a missing one.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        image = read_image(path)
    except OAVMInputError as exc:
        return str(exc)
    # EXR keeps channel names; PNG/TIFF name their channels by count (Y, YA, RGB, RGBA), so compare the count.
    same = (sorted(image.channels) == sorted(channels) if path.suffix.lower() == ".exr"
            else len(image.channels) == len(channels))
    if not same:
        return f"channels {', '.join(image.channels)} instead of {', '.join(channels)}"
    if image.data_window != data_window:
        return f"data window {image.data_window} instead of {data_window}"
    if display_window is not None and image.display_window != display_window:
        return f"display window {image.display_window} instead of {display_window}"
    if not np.isfinite(image.pixels).all():
        return "non-finite pixels"
    return None
