# SPDX-License-Identifier: GPL-3.0-or-later
"""Training data: loaders for the public datasets' documented layouts and the local sample data, and the clip
samplers that turn them into training clips.

Public layouts (paper Section 4.1; paths are recipe settings):

* VideoMatte240K (BGMv2): ``<root>/<split>/fgr/<clip>/<frame>.jpg`` and ``<root>/<split>/pha/<clip>/<frame>.jpg``.
* COCO panoptic: ``<root>/annotations/panoptic_<split>.json``, ``<root>/annotations/panoptic_<split>/<id>.png``
  (segment id = R + 256 G + 256^2 B) and ``<root>/<split>/<file_name>.jpg``.
* YouTube-VOS: ``<root>/<split>/JPEGImages/<video>/<frame>.jpg`` and ``<root>/<split>/Annotations/<video>/<frame>.png``
  (palette PNG, index = object id; in the train split every 5th frame is given).
* DVM backgrounds: ``<root>/<clip>/<frame>.jpg`` (video folders); BG20K: ``<root>/<split>/<image>.jpg`` (stills).

Local layouts (``/work/shared/data``): ``<root>/<seq>/frames/*.jpg`` + ``<root>/<seq>/masks/*.png`` for DAVIS-2016
(binary), DAVIS-2017 low-res and cutie examples (palette), weak_masks (binary); a flat folder of frames for the
bedroom background video.

A sampler's ``sample(rng, length, size)`` returns a :class:`Clip`. Everything random is drawn from the ``rng``
argument, so a clip is a pure function of the generator's seed: ``oavm train --resume`` only has to remember how
many clips it has drawn.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from oavm_service.errors import OAVMInputError
from oavm_service.io import images

from .composition import (MotionConfig, PromptNoiseConfig, SFMConfig, animate_still, binarize, corrupt_prompt,
                          sequential_foreground_merging)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".exr", ".tif", ".tiff")
Size = tuple[int, int]  # (height, width)


# ============================================================================================== image reading

def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image as ``(H, W, 3)`` float32 in 0..1 (grey is repeated, an alpha channel dropped)."""
    return np.ascontiguousarray(images.read_image(path).rgb())


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """A matte or binary mask as ``(H, W)`` float32 in 0..1 (its first channel)."""
    return np.ascontiguousarray(images.read_image(path).pixels[..., 0])


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Object ids ``(H, W)`` uint8: a palette PNG's indices (DAVIS-2017, YouTube-VOS), else ``grey > 0.5`` -> 1."""
    indices = images.palette_indices(path) if str(path).lower().endswith(".png") else None
    if indices is not None:
        return indices.astype(np.uint8)
    return (read_grey(path) > 0.5).astype(np.uint8)


# ================================================================================================== resizing

def resize(image: np.ndarray, size: Size, *, nearest: bool = False) -> np.ndarray:
    """Resize ``(H, W)`` or ``(H, W, C)`` to ``size`` (antialiased bilinear, or nearest for label maps)."""
    if image.shape[:2] == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t[None, None] if image.ndim == 2 else t.permute(2, 0, 1)[None]
    if nearest:
        out = F.interpolate(t.float(), size=size, mode="nearest-exact").to(t.dtype)
    else:
        out = F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    out = out[0, 0] if image.ndim == 2 else out[0].permute(1, 2, 0)
    return np.ascontiguousarray(out.numpy())


def cover_crop_box(src: Size, dst: Size, *, scale: float = 1.0, offset: tuple[float, float] = (0.5, 0.5)
                   ) -> tuple[int, int, int, int]:
    """The crop ``(y0, x0, h, w)`` of a ``src`` frame with ``dst``'s aspect ratio, ``1/scale`` of the largest one.

    ``offset`` in 0..1 places the crop (0.5, 0.5 = centred). Resizing the crop to ``dst`` then covers the frame
    without distortion; ``scale > 1`` zooms in (a data augmentation).
    """
    sh, sw = src
    dh, dw = dst
    ratio = min(sh / dh, sw / dw) / max(scale, 1.0)
    ch, cw = max(1, round(dh * ratio)), max(1, round(dw * ratio))
    return int((sh - ch) * offset[0]), int((sw - cw) * offset[1]), ch, cw


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: Size, *, nearest: bool = False) -> np.ndarray:
    y, x, h, w = box
    return resize(image[y:y + h, x:x + w], size, nearest=nearest)


class _ImageCache:
    """A small in-memory LRU of decoded, resized images (re-reading JPEGs dominates a CPU training step).

    Thread-safe: training draws the next batch on a worker thread while validation draws on the main one."""

    def __init__(self, capacity: int = 2048):
        self.capacity = capacity
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()                                   # outside the lock: decoding is the slow part
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


_CACHE = _ImageCache()


def load_rgb(path: Path, size: Size) -> np.ndarray:
    """A frame resized to cover ``size`` (centre crop), as uint8 to keep the cache small."""
    def load() -> np.ndarray:
        img = read_rgb(path)
        return np.rint(crop_resize(img, cover_crop_box(img.shape[:2], size), size) * 255).astype(np.uint8)
    return _CACHE.get(("rgb", str(path), size), load)


def load_grey(path: Path, size: Size) -> np.ndarray:
    def load() -> np.ndarray:
        img = read_grey(path)
        return np.rint(crop_resize(img, cover_crop_box(img.shape[:2], size), size) * 255).astype(np.uint8)
    return _CACHE.get(("grey", str(path), size), load)


def load_labels(path: Path, size: Size) -> np.ndarray:
    def load() -> np.ndarray:
        img = read_label_map(path)
        return crop_resize(img, cover_crop_box(img.shape[:2], size), size, nearest=True)
    return _CACHE.get(("labels", str(path), size), load)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


# ================================================================================================== layouts

def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise OAVMInputError(f"{what}: folder {path} does not exist. Set the dataset's path in the recipe (see "
                             "docs/training.md for the expected layout).")
    return path


@dataclass
class MaskedSequence:
    """A video with per-frame object-id masks (``None`` where a frame has no annotation)."""

    name: str
    frames: list[Path]
    masks: list[Path | None]

    def annotated(self) -> "MaskedSequence":
        """Only the annotated frames (YouTube-VOS train gives a mask every 5th frame)."""
        keep = [i for i, m in enumerate(self.masks) if m is not None]
        return MaskedSequence(self.name, [self.frames[i] for i in keep], [self.masks[i] for i in keep])


def _masked_sequence(name: str, frames_dir: Path, masks_dir: Path) -> MaskedSequence:
    """The frames of ``frames_dir`` with the mask of the same file stem from ``masks_dir`` (None where missing)."""
    frames = _images_in(frames_dir)
    by_stem = {p.stem: p for p in _images_in(masks_dir)} if masks_dir.is_dir() else {}
    return MaskedSequence(name, frames, [by_stem.get(f.stem) for f in frames])


def masked_videos(root: str | os.PathLike, *, frames_dir: str = "frames", masks_dir: str = "masks",
                  include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[MaskedSequence]:
    """Sequences laid out as ``<root>/<seq>/<frames_dir>/*`` + ``<root>/<seq>/<masks_dir>/*.png`` (DAVIS style).

    Masks pair with frames by file stem. ``include``/``exclude`` select sequences by name (hold-out sets).
    """
    root = _require_dir(Path(root), "masked video dataset")
    names = sorted(p.name for p in root.iterdir() if (p / frames_dir).is_dir())
    missing = sorted(set(include or ()) - set(names))
    if missing:
        raise OAVMInputError(f"{root}: no sequence(s) {', '.join(missing)}; available: {', '.join(names)}")
    out = []
    for name in names:
        if (include is not None and name not in include) or name in exclude:
            continue
        out.append(_masked_sequence(name, root / name / frames_dir, root / name / masks_dir))
    if not out:
        raise OAVMInputError(f"{root}: no sequences with a '{frames_dir}' folder were selected")
    return out


def youtubevos_videos(root: str | os.PathLike, split: str = "train", **select) -> list[MaskedSequence]:
    """YouTube-VOS: ``<root>/<split>/JPEGImages/<video>/`` + ``Annotations/<video>/`` (annotated frames only)."""
    base = _require_dir(Path(root) / split, "YouTube-VOS")
    _require_dir(base / "JPEGImages", "YouTube-VOS JPEGImages")
    _require_dir(base / "Annotations", "YouTube-VOS Annotations")
    include, exclude = select.get("include"), select.get("exclude", ())
    out = []
    for video in sorted(p.name for p in (base / "JPEGImages").iterdir() if p.is_dir()):
        if (include is not None and video not in include) or video in exclude:
            continue
        seq = _masked_sequence(video, base / "JPEGImages" / video, base / "Annotations" / video).annotated()
        if seq.frames:
            out.append(seq)
    return out


@dataclass
class MatteSequence:
    """A foreground video with its alpha (VideoMatte240K)."""

    name: str
    fgr: list[Path]
    pha: list[Path]


def videomatte_clips(root: str | os.PathLike, split: str = "train") -> list[MatteSequence]:
    """VideoMatte240K: ``<root>/<split>/fgr/<clip>/*.jpg`` and ``<root>/<split>/pha/<clip>/*.jpg`` (same names)."""
    base = Path(root) / split
    fgr_root = _require_dir(base / "fgr", "VideoMatte240K fgr")
    pha_root = _require_dir(base / "pha", "VideoMatte240K pha")
    out = []
    for clip in sorted(p.name for p in fgr_root.iterdir() if p.is_dir()):
        fgr = _images_in(fgr_root / clip)
        pha = {p.stem: p for p in _images_in(pha_root / clip)} if (pha_root / clip).is_dir() else {}
        missing = [f.name for f in fgr if f.stem not in pha]
        if missing:
            raise OAVMInputError(f"VideoMatte240K clip {clip}: no alpha for {missing[:3]}...; every fgr frame "
                                 f"needs a pha frame of the same name in {pha_root / clip}")
        out.append(MatteSequence(clip, fgr, [pha[f.stem] for f in fgr]))
    return out


def background_videos(root: str | os.PathLike, *, frames: tuple[int, int] | None = None) -> list[list[Path]]:
    """Background videos: every sub-folder of ``root`` with images is one video (DVM); a flat folder of images
    is itself one video (the bedroom clip). ``frames = (first, stop)`` keeps a frame range (a held-out tail)."""
    root = _require_dir(Path(root), "background videos")
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and _images_in(p)]
    videos = [_images_in(p) for p in subdirs] if subdirs else [_images_in(root)]
    if frames is not None:
        videos = [v[frames[0]:frames[1]] for v in videos]
    videos = [v for v in videos if v]
    if not videos:
        raise OAVMInputError(f"{root}: no background frames found (expected <root>/<clip>/*.jpg or <root>/*.jpg)")
    return videos


def background_images(root: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Still backgrounds (BG20K: ``<root>/<split>/*.jpg``)."""
    folder = _require_dir(Path(root) / split if split else Path(root), "background images")
    images = _images_in(folder)
    if not images:
        raise OAVMInputError(f"{folder}: no background images found")
    return images


@dataclass
class PanopticImage:
    """One COCO image with its panoptic PNG and the ids of its object ("thing") segments."""

    image: Path
    panoptic: Path
    segment_ids: list[int]

    def id_map(self) -> np.ndarray:
        """Segment ids ``(H, W)`` int64 at the image's resolution."""
        return read_panoptic(self.panoptic)


@dataclass
class InstanceImage:
    """One COCO image with its instance annotations (``instances_<split>.json``): polygons or RLE, drawn when used."""

    image: Path
    height: int
    width: int
    segments: list[tuple[int, Any]]          # (annotation id, segmentation), largest first

    @property
    def segment_ids(self) -> list[int]:
        return [ann_id for ann_id, _ in self.segments]

    def id_map(self) -> np.ndarray:
        """Annotation ids ``(H, W)`` int64; where instances overlap the smaller one is on top."""
        ids = np.zeros((self.height, self.width), np.int64)
        for ann_id, segmentation in self.segments:
            ids[segmentation_mask(segmentation, self.height, self.width)] = ann_id
        return ids


def coco_panoptic(root: str | os.PathLike, split: str = "train2017", *, min_area: int = 1024) -> list[PanopticImage]:
    """COCO panoptic: objects are the non-crowd segments of "thing" categories with at least ``min_area`` px."""
    root = Path(root)
    ann_file = root / "annotations" / f"panoptic_{split}.json"
    if not ann_file.is_file():
        raise OAVMInputError(f"COCO panoptic: {ann_file} not found. Download panoptic_annotations_trainval2017 and "
                             f"unzip it so that annotations/panoptic_{split}.json and annotations/panoptic_{split}/ "
                             "exist under the COCO root.")
    data = json.loads(ann_file.read_text())
    things = {c["id"] for c in data.get("categories", []) if c.get("isthing", 1)}
    names = {img["id"]: img["file_name"] for img in data["images"]}
    out = []
    for ann in data["annotations"]:
        ids = [s["id"] for s in ann["segments_info"]
               if s["category_id"] in things and not s.get("iscrowd", 0) and s.get("area", min_area) >= min_area]
        if ids:
            out.append(PanopticImage(root / split / names[ann["image_id"]],
                                     root / "annotations" / f"panoptic_{split}" / ann["file_name"], ids))
    return out


def coco_instances(root: str | os.PathLike, split: str = "train2017", *, min_area: int = 1024
                   ) -> list[InstanceImage]:
    """COCO instances (the usual download): objects are the non-crowd annotations of at least ``min_area`` px."""
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise OAVMInputError(f"COCO instances: {ann_file} not found. Download annotations_trainval2017 and unzip it "
                             f"so that annotations/instances_{split}.json exists under the COCO root.")
    data = json.loads(ann_file.read_text())
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0) and ann.get("area", min_area) >= min_area:
            per_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for img in data["images"]:
        anns = sorted(per_image.get(img["id"], []), key=lambda a: -a.get("area", 0))
        if anns:
            out.append(InstanceImage(root / split / img["file_name"], int(img["height"]), int(img["width"]),
                                     [(int(a["id"]), a["segmentation"]) for a in anns]))
    return out


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation as a bool ``(H, W)`` mask: polygons (``[[x0, y0, x1, y1, ...], ...]``: the parts of one
    object, united as pycocotools does; each filled at pixel centres) or RLE (``{"counts": [...] or "compressed",
    "size": [H, W]}``, column-major runs)."""
    if isinstance(segmentation, dict):
        return rle_mask(segmentation)
    mask = np.zeros((height, width), bool)
    for polygon in segmentation:
        mask |= polygon_mask(np.asarray(polygon, np.float64).reshape(-1, 2), height, width)
    return mask


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon ``points`` ((N, 2) x, y), by the even-odd rule, row by row."""
    mask = np.zeros((height, width), bool)
    if len(points) < 3:
        return mask
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(width) + 0.5
    for row in range(max(0, int(np.floor(y0.min()))), min(height, int(np.ceil(y0.max())) + 1)):
        y = row + 0.5
        crossing = (y0 <= y) != (y1 <= y)                       # edges that cross this row's centre line
        xs = np.sort(x0[crossing] + (y - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing]))
        for left, right in zip(xs[0::2], xs[1::2]):
            mask[row] |= (centres > left) & (centres < right)
    return mask


def rle_mask(rle: dict) -> np.ndarray:
    """COCO RLE: runs of 0s and 1s alternately (starting with 0s) over the pixels in column-major order."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts if isinstance(counts, str) else counts.decode("ascii"))
    values = np.zeros(height * width, bool)
    position = 0
    for k, run in enumerate(counts):
        if k % 2:
            values[position:position + run] = True
        position += run
    if position != height * width:
        raise OAVMInputError(f"a COCO RLE mask covers {position} pixels but its size is {height}x{width}; the "
                             f"annotation file is damaged")
    return values.reshape(width, height).T


def rle_counts_from_string(text: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' rleFrString): 5 bits a character, each run
    after the second stored as the difference to the run two before it."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def read_panoptic(path: str | os.PathLike) -> np.ndarray:
    """Segment ids ``(H, W)`` int64 of a COCO panoptic PNG: ``id = R + 256 G + 256^2 B``."""
    rgb = np.rint(read_rgb(path) * 255.0).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ====================================================================================================== clips

@dataclass
class Clip:
    """One training clip and its supervision (numpy; :func:`collate` makes tensors).

    ``alpha``/``foreground`` are None for segmentation-only data (COCO, YouTube-VOS): those clips train the mask
    and set-prediction heads only, as RVM trains its segmentation head.
    """

    frames: np.ndarray                 # (T, H, W, 3) float32
    fgmask: np.ndarray                 # (T, H, W) target foreground mask S_k in {0, 1}
    instances: np.ndarray              # (T, K, H, W) instance masks M_i in {0, 1}
    prompt: np.ndarray                 # (H, W) the corrupted first-frame mask
    alpha: np.ndarray | None = None    # (T, H, W)
    foreground: np.ndarray | None = None  # (T, H, W, 3)
    source: str = ""


class ClipSampler(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, length: int, size: Size) -> Clip: ...


@dataclass
class AugmentConfig:
    """Augmentations shared by the samplers."""

    flip_probability: float = 0.5
    reverse_probability: float = 0.5       # play the clip backwards (the service runs backwards from keyframes)
    max_stride: int = 2                    # temporal stride 1..max_stride (faster motion)
    still_probability: float = 0.2         # composite: use one frame of the foreground, animated (motion for stills)
    motion: MotionConfig = field(default_factory=MotionConfig)
    prompt: PromptNoiseConfig = field(default_factory=PromptNoiseConfig)
    sfm: SFMConfig = field(default_factory=SFMConfig)


def pick_window(n: int, length: int, rng: np.random.Generator, max_stride: int = 1) -> list[int]:
    """``length`` frame indices from a sequence of ``n`` frames: random start and stride, ping-pong if too short."""
    stride = int(rng.integers(1, max_stride + 1))
    span = (length - 1) * stride + 1
    if span <= n:
        start = int(rng.integers(0, n - span + 1))
        return [start + i * stride for i in range(length)]
    bounce = list(range(n)) + list(range(n - 2, 0, -1)) or [0]
    start = int(rng.integers(0, len(bounce)))
    return [bounce[(start + i) % len(bounce)] for i in range(length)]


def _maybe_flip_reverse(arrays: list[np.ndarray | None], flip: bool, reverse: bool) -> list[np.ndarray | None]:
    """Apply one flip/reverse decision to every ``(T, H, W, ...)`` array of a clip."""
    out = []
    for a in arrays:
        if a is not None:
            a = a[:, :, ::-1] if flip else a
            a = a[::-1] if reverse else a
            a = np.ascontiguousarray(a)
        out.append(a)
    return out


def finish_clip(frames, fgmask, instances, rng: np.random.Generator, aug: AugmentConfig, *, alpha=None,
                foreground=None, source: str = "") -> Clip:
    """Common tail of every sampler: flip, reverse, then corrupt the first frame's target mask into the prompt."""
    flip = bool(rng.random() < aug.flip_probability)
    reverse = bool(rng.random() < aug.reverse_probability)
    frames, fgmask, instances, alpha, foreground = _maybe_flip_reverse(
        [frames, fgmask, instances, alpha, foreground], flip, reverse)
    prompt = corrupt_prompt(fgmask[0], rng=rng, config=aug.prompt)
    return Clip(frames.astype(np.float32), fgmask.astype(np.float32), instances.astype(np.float32),
                prompt, alpha, foreground, source)


# --------------------------------------------------------------------------------- foreground/alpha providers

@dataclass
class MatteWindow:
    """Frames of a foreground layer: colour, alpha and (optionally) other objects' masks to use as instances."""

    fgr: np.ndarray    # (T, H, W, 3)
    pha: np.ndarray    # (T, H, W)


class MatteProvider(Protocol):
    """Anything that yields foreground layers with alpha: VideoMatte240K, or cut-outs of real footage."""

    def __len__(self) -> int: ...

    def window(self, index: int, rng: np.random.Generator, length: int, size: Size, max_stride: int) -> MatteWindow: ...


@dataclass
class VideoMatteProvider:
    """VideoMatte240K foregrounds (real alpha)."""

    clips: list[MatteSequence]

    def __len__(self) -> int:
        return len(self.clips)

    def window(self, index, rng, length, size, max_stride) -> MatteWindow:
        clip = self.clips[index]
        idx = pick_window(len(clip.fgr), length, rng, max_stride)
        fgr = np.stack([to_float(load_rgb(clip.fgr[i], size)) for i in idx])
        pha = np.stack([to_float(load_grey(clip.pha[i], size)) for i in idx])
        return MatteWindow(fgr, pha)


@dataclass
class CachedMatteProvider:
    """Cut-outs of real footage: the frame as foreground colour, the teacher's pseudo-alpha of one object as
    alpha (see :class:`TeacherCache`). Composited again, the pseudo-alpha is exact ground truth of the composite."""

    sequences: list["CachedSequence"]

    def __len__(self) -> int:
        return len(self.sequences)

    def window(self, index, rng, length, size, max_stride) -> MatteWindow:
        seq = self.sequences[index]
        obj = int(rng.integers(seq.alpha.shape[1]))
        idx = pick_window(seq.frames.shape[0], length, rng, max_stride)
        fgr = to_float(seq.frames[idx])
        pha = to_float(seq.alpha[idx, obj])
        if fgr.shape[1:3] != tuple(size):
            fgr = np.stack([resize(f, size) for f in fgr])
            pha = np.stack([resize(a, size) for a in pha])
        return MatteWindow(fgr, pha)


# --------------------------------------------------------------------------------------------- background providers

@dataclass
class BackgroundProvider:
    """Background clips: windows of background videos (DVM, bedroom) or animated stills (BG20K)."""

    videos: list[list[Path]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def window(self, rng: np.random.Generator, length: int, size: Size, aug: AugmentConfig) -> np.ndarray:
        n_video, n_image = len(self.videos), len(self.images)
        if n_video + n_image == 0:
            raise OAVMInputError("a composite dataset needs backgrounds: set 'backgrounds' in the recipe")
        pick = int(rng.integers(n_video + n_image))
        if pick < n_video:
            video = self.videos[pick]
            return np.stack([to_float(load_rgb(video[i], size)) for i in pick_window(len(video), length, rng,
                                                                                     aug.max_stride)])
        still = to_float(load_rgb(self.images[pick - n_video], size))
        return animate_still([still], length, rng=rng, config=aug.motion)[0]


# ----------------------------------------------------------------------------------------------------- samplers

@dataclass
class CompositeSampler:
    """Foreground layers composited over backgrounds with Sequential Foreground Merging (Section 3.5).

    This is how the paper uses VideoMatte240K, and how the local recipe uses teacher cut-outs of DAVIS objects.
    With ``still_probability`` the foreground is one frame animated by :func:`animate_still`.
    """

    name: str
    foregrounds: MatteProvider
    backgrounds: BackgroundProvider
    aug: AugmentConfig = field(default_factory=AugmentConfig)

    def _layer(self, rng, length, size) -> MatteWindow:
        index = int(rng.integers(len(self.foregrounds)))
        if rng.random() < self.aug.still_probability:
            still = self.foregrounds.window(index, rng, 1, size, 1)
            fgr, pha = animate_still([still.fgr[0], still.pha[0]], length, rng=rng, config=self.aug.motion)
            return MatteWindow(fgr, np.clip(pha, 0.0, 1.0))
        layer = self.foregrounds.window(index, rng, length, size, self.aug.max_stride)
        if rng.random() < 0.5:  # flip each layer independently of the others
            layer = MatteWindow(np.ascontiguousarray(layer.fgr[:, :, ::-1]), np.ascontiguousarray(layer.pha[:, :, ::-1]))
        return layer

    def sample(self, rng: np.random.Generator, length: int, size: Size) -> Clip:
        first = self._layer(rng, length, size)
        second = self._layer(rng, length, size)
        background = self.backgrounds.window(rng, length, size, self.aug)
        sfm = sequential_foreground_merging(first.fgr, first.pha, background, second.fgr, second.pha,
                                            rng=rng, config=self.aug.sfm)
        instances = np.stack(sfm.instances, axis=1)
        return finish_clip(sfm.image, binarize(sfm.alpha), instances, rng, self.aug, alpha=sfm.alpha,
                           foreground=sfm.foreground, source=self.name)


@dataclass
class CachedRealSampler:
    """Real footage with soft targets from the teacher cache: one or more of the sequence's objects are the target.

    The other objects stay in the picture as distractors and as instance targets, which trains the object
    discrimination the paper is about.
    """

    name: str
    sequences: list["CachedSequence"]
    aug: AugmentConfig = field(default_factory=AugmentConfig)

    def sample(self, rng: np.random.Generator, length: int, size: Size) -> Clip:
        seq = self.sequences[int(rng.integers(len(self.sequences)))]
        idx = pick_window(seq.frames.shape[0], length, rng, self.aug.max_stride)
        k = seq.alpha.shape[1]
        targets = [int(rng.integers(k))] if k > 1 and rng.random() < 0.7 else list(range(k))
        frames = to_float(seq.frames[idx])
        alphas = to_float(seq.alpha[idx])                                # (T, K, H, W)
        alpha = 1.0 - np.prod(1.0 - alphas[:, targets], axis=1)          # the union of the chosen objects
        labels = seq.labels[idx]
        instances = np.stack([(labels == obj) for obj in seq.object_ids], axis=1).astype(np.float32)
        fgmask = np.isin(labels, [seq.object_ids[t] for t in targets]).astype(np.float32)
        if frames.shape[1:3] != tuple(size):
            frames = np.stack([resize(f, size) for f in frames])
            alpha = np.stack([resize(a, size) for a in alpha])
            fgmask = np.stack([resize(m, size, nearest=True) for m in fgmask])
            instances = np.stack([[resize(m, size, nearest=True) for m in f] for f in instances])
        return finish_clip(frames, fgmask, instances, rng, self.aug, alpha=alpha.astype(np.float32),
                           source=self.name)


@dataclass
class VideoSegmentationSampler:
    """Video object segmentation without alpha (YouTube-VOS, DAVIS masks): masks and instances only."""

    name: str
    sequences: list[MaskedSequence]
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    max_instances: int = 8

    def sample(self, rng: np.random.Generator, length: int, size: Size) -> Clip:
        seq = self.sequences[int(rng.integers(len(self.sequences)))]
        seq = seq.annotated()
        idx = pick_window(len(seq.frames), length, rng, self.aug.max_stride)
        frames = np.stack([to_float(load_rgb(seq.frames[i], size)) for i in idx])
        labels = np.stack([load_labels(seq.masks[i], size) for i in idx])
        present = [int(v) for v in np.unique(labels[0]) if v != 0]
        if not present:  # an object must be visible in the prompted first frame
            present = [int(v) for v in np.unique(labels) if v != 0]
        objects = present[: self.max_instances]
        target = [objects[int(rng.integers(len(objects)))]] if objects else []
        instances = np.stack([(labels == o) for o in objects], axis=1) if objects else np.zeros(
            (length, 0) + tuple(size), np.float32)
        fgmask = np.isin(labels, target).astype(np.float32)
        return finish_clip(frames, fgmask, instances.astype(np.float32), rng, self.aug, source=self.name)


@dataclass
class ImageSegmentationSampler:
    """Still images with instance masks (COCO panoptic or instances), animated into clips by :func:`animate_still`."""

    name: str
    images: list[PanopticImage | InstanceImage]
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    max_instances: int = 8

    def sample(self, rng: np.random.Generator, length: int, size: Size) -> Clip:
        item = self.images[int(rng.integers(len(self.images)))]
        image = read_rgb(item.image)
        ids = item.id_map()
        box = cover_crop_box(image.shape[:2], size, scale=float(rng.uniform(1.0, 1.3)),
                             offset=tuple(rng.uniform(0.0, 1.0, size=2)))
        image = crop_resize(image, box, size)
        ids = crop_resize(ids, box, size, nearest=True)
        objects = [s for s in item.segment_ids if (ids == s).any()][: self.max_instances]
        if not objects:
            objects = item.segment_ids[:1]
        masks = [(ids == s).astype(np.float32) for s in objects]
        moved = animate_still([image, *masks], length, rng=rng, config=self.aug.motion)
        frames, instances = moved[0], np.stack([binarize(m) for m in moved[1:]], axis=1)
        target = int(rng.integers(len(objects)))
        return finish_clip(frames, instances[:, target], instances, rng, self.aug, source=self.name)


# ================================================================================================ teacher cache

@dataclass
class CachedSequence:
    """A real sequence at training resolution with the teacher's per-object pseudo-alpha (from the cache)."""

    name: str
    frames: np.ndarray      # (T, H, W, 3) uint8
    labels: np.ndarray      # (T, H, W) uint8 object ids
    alpha: np.ndarray       # (T, K, H, W) uint8 pseudo-alpha per object
    object_ids: list[int]


def whole_object_alpha(alpha: np.ndarray, labels: np.ndarray, object_ids: list[int]) -> np.ndarray:
    """Make the pseudo-alpha cover the whole annotated object, keeping RVM's soft edges where RVM sees it.

    ``teacher.pseudo_alpha`` keeps RVM's alpha inside the mask, so the parts of an object that RVM (a human
    matting model) does not see - the bike of "person on a bike", a dog's body next to its owner - drop to 0
    although the annotated mask (the prompt's object) includes them. Here, on the cached uint8 ``(T, K, H, W)``
    alpha: pixels far from anything RVM saw take the mask's value, and the mask's interior (eroded by the
    teacher's band) is always 1. Hand-annotated masks (DAVIS) exclude real holes already.
    """
    from scipy import ndimage

    from .teacher import band_px

    out = alpha.copy()
    band = band_px(labels.shape[1:], None)
    for t in range(alpha.shape[0]):
        for k, obj in enumerate(object_ids):
            mask = labels[t] == obj
            seen = ndimage.binary_dilation(alpha[t, k] > 127, iterations=2 * band)
            core = ndimage.binary_erosion(mask, iterations=band)
            out[t, k] = np.where(seen, alpha[t, k], mask.astype(np.uint8) * 255)
            out[t, k][core] = 255
    return out


def finish_cached(seq: CachedSequence) -> CachedSequence:
    """A stored sequence (teacher cache or data pack) as training uses it: alpha over the whole object."""
    return CachedSequence(seq.name, seq.frames, seq.labels, whole_object_alpha(seq.alpha, seq.labels, seq.object_ids),
                          seq.object_ids)


class TeacherCache:
    """Teacher (RVM) pseudo-alpha for real footage, computed once per sequence and resolution into ``folder``.

    DAVIS gives binary masks only; RVM's alpha restricted by each object's mask (``teacher.pseudo_alpha``) gives
    soft edges. Running RVM per training step would cost more than the training step, so the results are
    stored as one ``.npz`` per (dataset, sequence, size) and reused by every run. RVM runs recurrently over the
    whole sequence at ``teacher_scale`` times the training size (sharper edges than at training size, much
    cheaper than at full resolution); the pseudo-alpha is then resized to the training size.
    """

    VERSION = 1

    def __init__(self, folder: str | os.PathLike, *, teacher_scale: float = 2.0,
                 teacher_factory: Callable[[], object] | None = None):
        self.folder = Path(folder)
        self.teacher_scale = teacher_scale
        self._factory = teacher_factory
        self._teacher = None

    def path(self, dataset: str, seq: MaskedSequence, size: Size) -> Path:
        key = zlib.crc32(("|".join(str(p) for p in seq.frames + seq.masks) + f"|{self.teacher_scale}").encode())
        return self.folder / f"v{self.VERSION}" / dataset / f"{seq.name}_{size[1]}x{size[0]}_{key:08x}.npz"

    def load(self, dataset: str, seq: MaskedSequence, size: Size, *, log: Callable[[str], None] = print
             ) -> CachedSequence:
        """The sequence as training uses it (:func:`finish_cached`)."""
        return finish_cached(self.load_raw(dataset, seq, size, log=log))

    def load_raw(self, dataset: str, seq: MaskedSequence, size: Size, *, log: Callable[[str], None] = print
                 ) -> CachedSequence:
        """The sequence as stored: the teacher's pseudo-alpha as computed (what ``oavm pack-data`` packs)."""
        path = self.path(dataset, seq, size)
        if not path.exists():
            log(f"teacher cache: computing {dataset}/{seq.name} at {size[1]}x{size[0]} -> {path}")
            self._compute(seq, size, path)
        with np.load(path) as z:
            return CachedSequence(seq.name, z["frames"], z["labels"], z["alpha"], [int(v) for v in z["object_ids"]])

    def _teacher_instance(self):
        if self._teacher is None:
            if self._factory is None:
                from .teacher import RVMTeacher
                self._factory = RVMTeacher
            self._teacher = self._factory()
        return self._teacher

    def _compute(self, seq: MaskedSequence, size: Size, path: Path) -> None:
        from .teacher import pseudo_alpha

        seq = seq.annotated()
        if not seq.frames:
            raise OAVMInputError(f"sequence {seq.name} has no annotated frames; remove it from the recipe")
        big = (round(size[0] * self.teacher_scale), round(size[1] * self.teacher_scale))
        frames, labels = [], []
        for frame_path, mask_path in zip(seq.frames, seq.masks):
            frame, label = read_rgb(frame_path), read_label_map(mask_path)
            box = cover_crop_box(frame.shape[:2], big)
            frames.append(crop_resize(frame, box, big))
            labels.append(crop_resize(label, cover_crop_box(label.shape[:2], big), big, nearest=True))
        frames_big, labels_big = np.clip(np.stack(frames), 0, 1), np.stack(labels)
        object_ids = [int(v) for v in np.unique(labels_big) if v != 0]
        if not object_ids:
            raise OAVMInputError(f"sequence {seq.name} has no object in any mask; remove it from the recipe")
        rvm = self._teacher_instance()(frames_big).alpha                     # (T, h, w), recurrent RVM
        alpha = np.stack([[resize(pseudo_alpha(a, l == obj), size) for obj in object_ids]
                          for a, l in zip(rvm, labels_big)])                  # (T, K, H, W)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(
            tmp, frames=np.rint(np.stack([resize(f, size) for f in frames_big]) * 255).astype(np.uint8),
            labels=np.stack([resize(l, size, nearest=True) for l in labels_big]).astype(np.uint8),
            alpha=np.rint(np.clip(alpha, 0, 1) * 255).astype(np.uint8), object_ids=np.array(object_ids, np.int64))
        os.replace(tmp, path)


# ================================================================================================== batching

@dataclass
class Batch:
    """A batch of clips as tensors ``(B, T, C, H, W)``; per-clip instance masks stay a list (K differs)."""

    frames: torch.Tensor
    fgmask: torch.Tensor
    prompt: torch.Tensor                     # (B, 1, H, W)
    instances: list[torch.Tensor]            # B x (T, K, H, W)
    alpha: torch.Tensor | None = None
    foreground: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.frames), move(self.fgmask), move(self.prompt), [m.to(device) for m in self.instances],
                     move(self.alpha), move(self.foreground), self.sources)


def collate(clips: list[Clip]) -> Batch:
    """Stack clips of one sampler (all with alpha, or none) into a :class:`Batch`."""
    def stack(arrays, channels_last: bool) -> torch.Tensor:
        t = torch.from_numpy(np.stack(arrays))
        return t.permute(0, 1, 4, 2, 3).contiguous() if channels_last else t[:, :, None].contiguous()

    with_alpha = [c.alpha is not None for c in clips]
    if any(with_alpha) and not all(with_alpha):
        raise ValueError("a batch mixes clips with and without alpha; draw each batch from one sampler")
    with_fgr = all(c.foreground is not None for c in clips)
    return Batch(
        frames=stack([c.frames for c in clips], True),
        fgmask=stack([c.fgmask for c in clips], False),
        prompt=torch.from_numpy(np.stack([c.prompt for c in clips]))[:, None].contiguous(),
        instances=[torch.from_numpy(np.ascontiguousarray(c.instances)) for c in clips],
        alpha=stack([c.alpha for c in clips], False) if all(with_alpha) else None,
        foreground=stack([c.foreground for c in clips], True) if with_fgr else None,
        sources=[c.source for c in clips],
    )
