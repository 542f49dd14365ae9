# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm eval``: score a checkpoint (through the Engine API) and baselines on a folder of clips.

A data folder holds one sub-folder per clip::

    <clip>/frames/*.{jpg,png,exr,...}   the plate, sorted by name
    <clip>/alpha/*                      soft ground truth, one per frame  -> MAD, MSE, Grad, Conn, dtSSD
    <clip>/masks/*                      binary ground truth, one per frame -> J, F, J&F
    <clip>/prompt.png                   optional first-frame mask; default: the first alpha/mask file (> 0.5)

Every method sees the first frame with the prompt (the paper's setting: one coarse mask on the first frame) and
then the remaining frames in order. Baselines are scored the same way:

* ``copy-mask``: the prompt copied to every frame (what a still rotoscope gives; J = 1 on a static shot);
* ``rvm-frame``: RVM with its recurrent state reset every frame (a matting network without temporal memory);
* ``rvm``: RVM as published (recurrent). Neither RVM baseline uses the prompt: RVM mattes every person.

``make_composite_eval_set`` builds the held-out composite clips with real alpha (Adobe Composition-1k crops
over the bedroom video's frames 150-199) - evaluation only: that data is non-commercial.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from oavm_service.errors import OAVMError, OAVMInputError
from oavm_service.io.images import read_image, read_mask, write_image
from oavm_service.train.data import cover_crop_box, crop_resize, read_grey
from oavm_service.train.metrics import ALPHA_METRICS, MASK_METRICS, AlphaClipScore, MaskClipScore

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".exr", ".tif", ".tiff", ".dpx")
OBJECT_ID = "object"
BASELINES = ("copy-mask", "rvm-frame", "rvm")

SHARED_DATA = Path("/work/shared/data")
COMP1K_CROPS = SHARED_DATA / "image_alpha" / "comp1k_crops"
BEDROOM = SHARED_DATA / "backgrounds" / "bedroom"
HELD_OUT_BACKGROUND_FRAMES = range(150, 200)   # the bedroom frames no training recipe may use


# ===================================================================================================== clips

@dataclass(frozen=True)
class EvalClip:
    """One clip of a data folder: its frames, its ground truth (alpha or masks) and its first-frame prompt."""

    name: str
    frames: tuple[Path, ...]
    truth: tuple[Path, ...]
    truth_kind: str            # "alpha" (soft) or "mask" (binary)
    prompt: Path


def _images_in(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")))


def find_clips(folder: str | Path, names: Sequence[str] | None = None) -> list[EvalClip]:
    """The clips of a data folder (see the module docstring), sorted by name; ``names`` selects some."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OAVMInputError(f"evaluation data folder {folder} does not exist; give --data a folder of clips "
                             "(<clip>/frames/ + <clip>/alpha/ or <clip>/masks/).")
    clips = []
    for clip_dir in sorted(p for p in folder.iterdir() if (p / "frames").is_dir()):
        if names is not None and clip_dir.name not in names:
            continue
        kind = "alpha" if (clip_dir / "alpha").is_dir() else "mask" if (clip_dir / "masks").is_dir() else None
        if kind is None:
            raise OAVMInputError(f"clip {clip_dir} has frames/ but no ground truth; add alpha/ (soft mattes) or "
                                 "masks/ (binary masks), one file per frame.")
        frames = _images_in(clip_dir / "frames")
        truth = _images_in(clip_dir / ("alpha" if kind == "alpha" else "masks"))
        if not frames:
            raise OAVMInputError(f"clip {clip_dir.name}: frames/ holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        if len(truth) != len(frames):
            raise OAVMInputError(f"clip {clip_dir.name} has {len(frames)} frames but {len(truth)} ground-truth "
                                 f"files in {kind if kind == 'alpha' else 'masks'}/; give one per frame "
                                 "(sorted by name in the same order).")
        prompt = clip_dir / "prompt.png"
        clips.append(EvalClip(clip_dir.name, frames, truth, kind, prompt if prompt.is_file() else truth[0]))
    if names is not None:
        missing = sorted(set(names) - {c.name for c in clips})
        if missing:
            raise OAVMInputError(f"no clip(s) {', '.join(missing)} in {folder}.")
    if not clips:
        raise OAVMInputError(f"{folder} holds no clips: expected sub-folders <clip>/frames/ with <clip>/alpha/ or "
                             "<clip>/masks/. `oavm eval --make-composite-set DIR` builds a set with real alpha.")
    return clips


def read_frame(path: Path) -> np.ndarray:
    """A plate as the engine wants it: (H, W, 3) float32 display-referred in [0, 1] (linear EXR -> sRGB)."""
    return read_image(path).network_rgb()


def read_truth(path: Path, kind: str) -> np.ndarray:
    """Ground truth as (H, W) float32: alpha exactly as stored (its first channel), masks binarised (> 0.5; a
    palette PNG's object != 0)."""
    if kind == "alpha":
        return np.clip(read_grey(path), 0.0, 1.0)
    return (read_mask(path)[1] > 0.5).astype(np.float32)


def read_prompt(clip: EvalClip) -> np.ndarray:
    """The first-frame prompt: a binary mask (a coarse segmentation, never the soft alpha itself)."""
    _, coverage = read_mask(clip.prompt)
    prompt = (coverage > 0.5).astype(np.float32)
    if not prompt.any():
        raise OAVMInputError(f"clip {clip.name}: the prompt {clip.prompt} is empty; give a prompt.png that marks "
                             "the object on the first frame.")
    return prompt


# =================================================================================================== methods

class Method(Protocol):
    """Something that mattes a clip given the first frame's prompt."""

    name: str

    def start(self, frame: np.ndarray, prompt: np.ndarray) -> np.ndarray: ...   # first frame's alpha

    def step(self, frame: np.ndarray) -> np.ndarray: ...                         # every later frame's alpha


class CopyMask:
    """Baseline: the first-frame mask, unchanged, on every frame."""

    name = "copy-mask"

    def start(self, frame: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        self._prompt = prompt
        return prompt

    def step(self, frame: np.ndarray) -> np.ndarray:
        return self._prompt


class RVMMethod:
    """Baseline: RVM (ONNX) recurrent, or frame by frame (``recurrent=False``); the prompt is not used."""

    def __init__(self, *, recurrent: bool, onnx_path: str | Path | None = None) -> None:
        from oavm_service.train.teacher import RVMTeacher

        self.name = "rvm" if recurrent else "rvm-frame"
        self.teacher = RVMTeacher(onnx_path, recurrent=recurrent)

    def start(self, frame: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        self.teacher.reset()
        return self.teacher.step(frame)[0]

    def step(self, frame: np.ndarray) -> np.ndarray:
        return self.teacher.step(frame)[0]


class EngineMethod:
    """A checkpoint run through the Engine API: a new ClipSession per clip, the prompt on the first frame."""

    def __init__(self, checkpoint: str | Path | None, *, device: str = "auto", precision: str = "auto",
                 downsample_ratio: float | None = None) -> None:
        from oavm_service.engine import Engine

        self.engine = Engine.from_checkpoint(checkpoint, device=device, precision=precision)
        self.downsample_ratio = downsample_ratio
        self.name = Path(checkpoint).name if checkpoint is not None else "default-checkpoint"

    def start(self, frame: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        self.session = self.engine.new_session(downsample_ratio=self.downsample_ratio, foreground=False)
        return self.session.step(frame, {OBJECT_ID: prompt})[OBJECT_ID].alpha

    def step(self, frame: np.ndarray) -> np.ndarray:
        return self.session.step(frame)[OBJECT_ID].alpha


def make_method(name: str, *, checkpoint: str | Path | None = None, device: str = "auto",
                rvm_onnx: str | Path | None = None, downsample_ratio: float | None = None) -> Method:
    """A baseline by name (``copy-mask``, ``rvm-frame``, ``rvm``) or, for ``checkpoint``, the engine."""
    if name == "copy-mask":
        return CopyMask()
    if name in ("rvm-frame", "rvm"):
        return RVMMethod(recurrent=name == "rvm", onnx_path=rvm_onnx)
    if name == "checkpoint":
        return EngineMethod(checkpoint, device=device, downsample_ratio=downsample_ratio)
    raise OAVMInputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.")


# ================================================================================================ evaluation

def evaluate_clip(clip: EvalClip, method: Method, *, max_frames: int | None = None) -> dict[str, float]:
    """Run ``method`` over ``clip`` and score every frame against the ground truth.

    Alpha clips get MAD, MSE, Grad, Conn (mean over frames, the prompt frame included: its soft alpha is still
    to be predicted) and dtSSD (mean over frame pairs); mask clips get J, F, J&F (the prompt frame excluded, as
    DAVIS). Also ``frames`` and ``ms_per_frame`` (the method's own time, reading and scoring excluded).
    """
    score = AlphaClipScore() if clip.truth_kind == "alpha" else MaskClipScore(skip_first=True)
    count = len(clip.frames) if max_frames is None else min(max_frames, len(clip.frames))
    seconds = 0.0
    for i in range(count):
        frame = read_frame(clip.frames[i])
        truth = read_truth(clip.truth[i], clip.truth_kind)
        if truth.shape != frame.shape[:2]:
            raise OAVMInputError(f"clip {clip.name}: {clip.truth[i].name} is {truth.shape[1]}x{truth.shape[0]} "
                                 f"but frame {clip.frames[i].name} is {frame.shape[1]}x{frame.shape[0]}; give "
                                 "ground truth at the plate's resolution.")
        t0 = time.perf_counter()
        if i == 0:
            prompt = read_prompt(clip)
            if prompt.shape != frame.shape[:2]:
                raise OAVMInputError(f"clip {clip.name}: the prompt {clip.prompt} is not the frame's size.")
            alpha = method.start(frame, prompt)
        else:
            alpha = method.step(frame)
        seconds += time.perf_counter() - t0
        score.add(np.clip(np.asarray(alpha, np.float64), 0, 1), truth)
    return {"frames": count, "ms_per_frame": 1e3 * seconds / count, **score.result()}


def _mean(rows: Iterable[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if values:
            out[key] = float(np.mean(values))
    return out


def evaluate(clips: Sequence[EvalClip], methods: Sequence[Method], *, max_frames: int | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Every method on every clip -> ``{"methods": {name: {"clips": {clip: {...}}, "mean": {...}}}}``.

    The mean is over clips (each clip counts once whatever its length), per metric over the clips that have it.
    """
    results: dict = {"methods": {}}
    for method in methods:
        per_clip = {}
        for clip in clips:
            frames = len(clip.frames) if max_frames is None else min(max_frames, len(clip.frames))
            log(f"  {method.name}: {clip.name} ({clip.truth_kind} ground truth, {frames} frames)")
            per_clip[clip.name] = {"truth": clip.truth_kind, **evaluate_clip(clip, method, max_frames=max_frames)}
        rows = list(per_clip.values())
        results["methods"][method.name] = {
            "clips": per_clip,
            "mean": _mean(rows, (*ALPHA_METRICS, *MASK_METRICS, "ms_per_frame")),
        }
    return results


# ==================================================================================================== output

_FORMATS = {"MAD": "{:.2f}", "MSE": "{:.2f}", "Grad": "{:.2f}", "Conn": "{:.2f}", "dtSSD": "{:.2f}",
            "J": "{:.3f}", "F": "{:.3f}", "J&F": "{:.3f}", "ms_per_frame": "{:.0f}", "frames": "{:d}"}
_HEADINGS = {"ms_per_frame": "ms/frame"}


def format_table(results: dict) -> str:
    """Per method: one row per clip and a mean row; only the metric columns some clip has."""
    lines = []
    for name, result in results["methods"].items():
        rows = {**result["clips"], "mean": result["mean"]}
        columns = ["frames"] + [m for m in (*ALPHA_METRICS, *MASK_METRICS)
                                if any(m in r for r in result["clips"].values())] + ["ms_per_frame"]
        width = max(12, *(len(c) + 2 for c in rows))
        lines.append(f"== {name}")
        lines.append("clip".ljust(width) + "".join(_HEADINGS.get(c, c).rjust(9) for c in columns))
        for clip, row in rows.items():
            cells = []
            for c in columns:
                v = row.get(c)
                cells.append(("-" if v is None or (isinstance(v, float) and math.isnan(v))
                              else _FORMATS[c].format(v)).rjust(9))
            lines.append(clip.ljust(width) + "".join(cells))
        lines.append("")
    lines.append("MAD, MSE x1e3; Grad, Conn x1e-3; dtSSD x1e2 (RVM benchmark scales); lower is better. "
                 "J, F: DAVIS, higher is better.")
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


# ================================================================================= composite evaluation set

def make_composite_eval_set(out_dir: str | Path, *, crops: str | Path = COMP1K_CROPS,
                            backgrounds: str | Path = BEDROOM,
                            background_frames: Sequence[int] = HELD_OUT_BACKGROUND_FRAMES,
                            indices: Sequence[int] | None = None, num_frames: int | None = None,
                            size: tuple[int, int] | None = None, seed: int = 0) -> list[Path]:
    """Composite clips with real alpha: each ``{i}_image.png`` / ``{i}_alpha.png`` crop moved by a smooth
    affine drift over the held-out background frames -> ``out_dir/comp1k_{i}/frames/`` and ``alpha/``.

    The crops were already composited on a photo, so the foreground colour F is estimated by the image itself
    where alpha > 0 (adequate for scoring alpha, not for scoring foreground colour). Each crop fills the frame
    (its cut edges lie on the frame edges, as in a close-up), the background shows through alpha < 1, and
    ``I = alpha F + (1 - alpha) B`` (Eq. 1). ``size`` (H, W) defaults to the crop's own size; ``num_frames``
    to the number of background frames. Frames and alpha are written as 16-bit PNG.

    Adobe Composition-1k is licensed for non-commercial research: these clips are for evaluation only and must
    never be shipped or trained on (a NOTICE file saying so is written into ``out_dir``).
    """
    from oavm_service.train.composition import MotionConfig, animate_still, composite

    crops, backgrounds, out_dir = Path(crops), Path(backgrounds), Path(out_dir)
    bg_paths = [backgrounds / f"{i:05d}.jpg" for i in background_frames]
    missing = [p for p in bg_paths if not p.is_file()]
    if missing:
        raise OAVMInputError(f"background frame {missing[0]} does not exist; pass --backgrounds with the bedroom "
                             "video's folder (frames 00150.jpg-00199.jpg).")
    indices = sorted(int(p.name.split("_")[0]) for p in crops.glob("*_alpha.png")) if indices is None else indices
    if not indices:
        raise OAVMInputError(f"{crops} holds no <i>_alpha.png / <i>_image.png pairs.")
    length = num_frames or len(bg_paths)
    if length > len(bg_paths):
        raise OAVMInputError(f"num_frames {length} > the {len(bg_paths)} held-out background frames.")
    rng = np.random.default_rng(seed)
    # gentle drift: the network must track the object, not chase it out of frame
    motion = MotionConfig(max_shift=0.06, max_zoom=0.08, max_rotate_deg=3.0, blur_probability=0.0)
    clip_dirs = []
    for i in indices:
        alpha = read_grey(crops / f"{i}_alpha.png")
        fg = read_image(crops / f"{i}_image.png").rgb()
        hw = size or alpha.shape
        fg, alpha = crop_resize(fg, cover_crop_box(fg.shape[:2], hw), hw), crop_resize(alpha, cover_crop_box(
            alpha.shape, hw), hw)
        fgs, alphas = animate_still([fg, alpha], length, rng=rng, config=motion)
        start = int(rng.integers(0, len(bg_paths) - length + 1))
        bgs = np.stack([crop_resize(b, cover_crop_box(b.shape[:2], hw), hw)
                        for b in (read_image(p).rgb() for p in bg_paths[start:start + length])])
        alphas = np.clip(alphas, 0, 1)
        frames = np.clip(composite(fgs, alphas, bgs), 0, 1)
        clip_dir = out_dir / f"comp1k_{i}"
        for t in range(length):
            write_image(clip_dir / "frames" / f"{t:05d}.png", frames[t], ["R", "G", "B"])
            write_image(clip_dir / "alpha" / f"{t:05d}.png", alphas[t][..., None], ["Y"])
        clip_dirs.append(clip_dir)
    (out_dir / "NOTICE.txt").write_text(
        "Composite evaluation clips made by `oavm eval --make-composite-set` from crops of the Adobe\n"
        "Composition-1k test set (foregrounds and alpha) over a background video (Apache-2.0, SAM 2 release).\n"
        "Adobe's matting data is licensed for non-commercial research only: use these clips for evaluation,\n"
        "never for training, and never ship them.\n")
    return clip_dirs


# ======================================================================================================= CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oavm eval",
        description="Score a checkpoint and/or baselines on a folder of clips: MAD, MSE, Grad, Conn, dtSSD "
                    "(alpha ground truth, RVM benchmark scales) and J, F (binary masks, DAVIS).")
    p.add_argument("--data", type=Path, help="folder of clips: <clip>/frames/ + <clip>/alpha/ or <clip>/masks/")
    p.add_argument("--checkpoint", type=Path,
                   help="OAVM checkpoint (.safetensors); default: the shipped one, unless only --baseline is given")
    p.add_argument("--baseline", action="append", choices=BASELINES, default=[],
                   help="also score a baseline (repeatable): copy-mask, rvm-frame (RVM without recurrence), rvm")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--clips", help="comma-separated clip names to score (default: all)")
    p.add_argument("--max-frames", type=int, help="score only the first N frames of each clip (quick checks)")
    p.add_argument("--device", default="auto", help="engine device: auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--downsample-ratio", type=float,
                   help="network resolution of the checkpoint as a fraction of the clip's (default: automatic, "
                        "long side 512 px)")
    p.add_argument("--rvm-onnx", type=Path, help="RVM ONNX file for the RVM baselines (default: installed package)")
    p.add_argument("--make-composite-set", type=Path, metavar="DIR",
                   help="write the composite clips (Adobe crops over held-out bedroom frames) into DIR; "
                        "evaluation only, non-commercial data")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.make_composite_set is not None:
            dirs = make_composite_eval_set(args.make_composite_set)
            print(f"wrote {len(dirs)} composite clips to {args.make_composite_set}")
            if args.data is None:
                return 0
        if args.data is None:
            raise OAVMInputError("give --data FOLDER (clips to score), or --make-composite-set DIR to build one.")
        if args.max_frames is not None and args.max_frames < 1:
            raise OAVMInputError("--max-frames must be 1 or more.")
        if args.downsample_ratio is not None and not 0.0 < args.downsample_ratio <= 1.0:
            raise OAVMInputError("--downsample-ratio must be in (0, 1], e.g. 0.5 to run the network at half size.")
        clips = find_clips(args.data, args.clips.split(",") if args.clips else None)
        names = (["checkpoint"] if args.checkpoint is not None or not args.baseline else []) + \
            list(dict.fromkeys(args.baseline))
        methods = [make_method(n, checkpoint=args.checkpoint, device=args.device, rvm_onnx=args.rvm_onnx,
                               downsample_ratio=args.downsample_ratio) for n in names]
        print(f"scoring {len(methods)} method(s) on {len(clips)} clip(s) from {args.data}")
        results = evaluate(clips, methods, max_frames=args.max_frames)
    except OAVMError as exc:
        print(f"oavm eval: {exc}", file=sys.stderr)
        return 2
    results["data"] = str(args.data)
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(results), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
