# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm train``: train OAVM from a recipe (``configs/*.toml``), resumable exactly.

    oavm train --config configs/local.toml [--resume PATH] [--max-minutes M] [--device cpu|cuda] [--out DIR]

A recipe names the datasets (see :mod:`oavm_service.train.data`) and the stages of the paper's schedule (Section
4.1: stage 1 lr 2e-4, wd 0.07, low resolution; stage 2 lr 1e-5, wd 0.07, high resolution), each trained with
AdamW and a warm-up + cosine learning-rate schedule.

Exact resumption: every clip is drawn from a generator seeded by ``(seed, stage, step, i)``, so the data position
is just the step counter. A checkpoint (``<out>/checkpoints/last.pt``) holds model, optimizer, scheduler,
grad-scaler and RNG states plus that counter; ``--resume`` continues bit-identically on the same device.

Outputs in ``--out`` (default ``runs/<recipe name>``): ``train.log``, ``scalars.csv`` (and TensorBoard events when
``tensorboard`` is installed), ``samples/step_XXXXXX.png`` (frames / target alpha / predicted alpha / prompt),
``checkpoints/last.pt``, and fp16 inference checkpoints ``best.safetensors`` (lowest validation loss) and
``final.safetensors`` written by :func:`oavm_service.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import math
import os
import random
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from oavm_service.errors import OAVMInputError
from oavm_service.read_ahead import ReadAhead

from . import data as D
from .composition import MotionConfig, PromptNoiseConfig, SFMConfig
from .losses import LossConfig, SetTarget, WeightedLoss, matting_loss, segmentation_loss, set_prediction_loss, total_loss

REPO = Path(__file__).resolve().parents[2]


# ============================================================================================== recipe

@dataclass
class StageConfig:
    """One stage of the schedule. ``steps`` wins over ``epochs`` (``epochs * clips_per_epoch / batch_size``)."""

    name: str
    datasets: dict[str, float]                 # sampler name -> weight (which sampler a step draws its batch from)
    size: tuple[int, int] = (144, 256)         # (height, width) of training clips
    clip_length: int = 4
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.07
    steps: int | None = None
    epochs: float | None = None
    clips_per_epoch: int | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05                 # cosine decays to lr * min_lr_ratio
    lr_scales: dict[str, float] = field(default_factory=dict)  # module prefix -> lr factor, e.g. pretrained
                                                               # {decoder = 0.1}: RVM also trains its
                                                               # pretrained parts slower than new ones

    def total_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is None or not self.clips_per_epoch:
            raise OAVMInputError(f"stage {self.name!r}: give 'steps', or 'epochs' and 'clips_per_epoch'")
        return max(1, math.ceil(self.epochs * self.clips_per_epoch / self.batch_size))


@dataclass
class TrainConfig:
    """Everything outside the stages and datasets."""

    seed: int = 0
    init: str = "random"               # "random" | "rvm" (load_rvm_weights) | path of an .safetensors/.pt
    num_threads: int = 0               # torch CPU threads (0 = torch's default)
    log_every: int = 10
    checkpoint_every: int = 100
    sample_every: int = 100
    val_every: int = 0                 # 0 = no validation
    val_clips: int = 4
    val_clip_length: int = 8
    amp: bool = True                   # mixed precision on CUDA (fp16 autocast + GradScaler); ignored on CPU
    grad_clip: float = 1.0
    freeze: list[str] = field(default_factory=list)  # module prefixes kept fixed, e.g. ["backbone"]
    freeze_batchnorm: bool = True      # keep BN statistics of the (pretrained) backbone; batches here are small
    cache_dir: str = ".cache/teacher"
    teacher_scale: float = 2.0
    prefetch: bool | None = None       # draw the next batch on a worker thread during a step (None: on CUDA, where
                                       # drawing in line would leave the GPU idle; same batches either way)
    data_pack: str = ""                # a folder from `oavm pack-data`: read the teacher sequences and background
                                       # videos from it instead of their roots (a run on another machine)
    ema_decay: float = 0.0             # > 0: validate and export an exponential moving average of the weights
                                       # (0.99 ~ the last 100 steps): batch-1 CPU training is noisy step to step


@dataclass
class Recipe:
    name: str
    train: TrainConfig
    model: dict[str, Any]
    loss: LossConfig
    augment: D.AugmentConfig
    datasets: dict[str, dict[str, Any]]
    validation: list[str]
    stages: list[StageConfig]
    source: dict[str, Any] = field(default_factory=dict)


def _dataclass_from(cls, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OAVMInputError(f"recipe [{where}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse a TOML recipe. Paths inside it are relative to the repository root unless absolute.

    ``extends = "other.toml"`` (beside this file) starts from that recipe: tables merge key by key, anything else
    (``stages``, ``validation``, a dataset's ``sources``) is replaced as a whole.
    """
    return recipe_from_dict(_read_recipe(Path(path)), default_name=Path(path).stem)


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise OAVMInputError(f"recipe {path} not found; pass one of configs/*.toml with --config")
    if path.resolve() in seen:
        raise OAVMInputError(f"recipe {path} extends itself (through {' -> '.join(p.name for p in seen)})")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return _merged(_read_recipe(path.parent / base, seen + (path.resolve(),)), raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_from_dict(raw: dict[str, Any], default_name: str = "recipe") -> Recipe:
    aug = dict(raw.get("augment", {}))
    augment = D.AugmentConfig(
        **{k: v for k, v in aug.items() if k not in ("motion", "prompt", "sfm")},
        motion=_dataclass_from(MotionConfig, aug.get("motion", {}), "augment.motion"),
        prompt=_dataclass_from(PromptNoiseConfig, aug.get("prompt", {}), "augment.prompt"),
        sfm=_dataclass_from(SFMConfig, aug.get("sfm", {}), "augment.sfm"))
    stages = []
    for s in raw.get("stages", []):
        s = dict(s)
        if "size" in s:
            s["size"] = tuple(s["size"])
        stages.append(_dataclass_from(StageConfig, s, f"stages.{s.get('name', '?')}"))
    if not stages:
        raise OAVMInputError("the recipe has no [[stages]]; see configs/local.toml for an example")
    datasets = dict(raw.get("datasets", {}))
    for stage in stages:
        missing = sorted(set(stage.datasets) - set(datasets))
        if missing:
            raise OAVMInputError(f"stage {stage.name!r} uses dataset(s) {', '.join(missing)} that the recipe does "
                                 f"not define under [datasets.<name>]")
    return Recipe(name=raw.get("name", default_name),
                  train=_dataclass_from(TrainConfig, raw.get("train", {}), "train"),
                  model=dict(raw.get("model", {})),
                  loss=_dataclass_from(LossConfig, raw.get("loss", {}), "loss"),
                  augment=augment, datasets=datasets, validation=list(raw.get("validation", [])),
                  stages=stages, source=raw)


def _path(p: str) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(p)))
    return p if p.is_absolute() else REPO / p


# ============================================================================================== samplers

def open_data_pack(recipe: Recipe):
    """The recipe's ``train.data_pack`` (a :class:`pack.DataPack`), or None. Open it once for all datasets and
    stages: it reads each packed sequence once."""
    if not recipe.train.data_pack:
        return None
    from .pack import DataPack
    return DataPack(_path(recipe.train.data_pack))


def build_sampler(name: str, spec: dict[str, Any], recipe: Recipe, size: tuple[int, int],
                  log: Callable[[str], None], pack=None) -> D.ClipSampler:
    """Build one named dataset of the recipe (``kind`` = composite | real | video_seg | image_seg); ``pack``: the
    recipe's opened data pack (:func:`open_data_pack`), opened here when not given."""
    kind = spec.get("kind")
    aug = recipe.augment
    cache = D.TeacherCache(_path(recipe.train.cache_dir), teacher_scale=recipe.train.teacher_scale)
    if pack is None:
        pack = open_data_pack(recipe)

    def teacher_sequences(items: list[dict[str, Any]]) -> list[D.CachedSequence]:
        out = []
        for item in items:
            if pack is not None:
                out += pack.sequences(item, size)
                continue
            for seq in D.masked_videos(_path(item["root"]), include=item.get("include"),
                                       exclude=item.get("exclude", ())):
                out.append(cache.load(item.get("name", Path(item["root"]).name), seq, size, log=log))
        return out

    if kind == "composite":
        fg = spec.get("foregrounds", {})
        if fg.get("kind") == "videomatte":
            provider = D.VideoMatteProvider(D.videomatte_clips(_path(fg["root"]), fg.get("split", "train")))
        elif fg.get("kind") == "teacher":
            provider = D.CachedMatteProvider(teacher_sequences(fg["sources"]))
        else:
            raise OAVMInputError(f"dataset {name}: foregrounds.kind must be 'videomatte' or 'teacher'")
        backgrounds = D.BackgroundProvider()
        for bg in spec.get("backgrounds", []):
            if bg.get("kind") == "videos" and pack is not None:
                backgrounds.videos += pack.background_videos(bg, size)
            elif bg.get("kind") == "videos":
                frames = tuple(bg["frames"]) if "frames" in bg else None
                backgrounds.videos += D.background_videos(_path(bg["root"]), frames=frames)
            elif bg.get("kind") == "images":
                backgrounds.images += D.background_images(_path(bg["root"]), bg.get("split"))
            else:
                raise OAVMInputError(f"dataset {name}: each background needs kind = 'videos' or 'images'")
        return D.CompositeSampler(name, provider, backgrounds, aug)
    if kind == "real":
        return D.CachedRealSampler(name, teacher_sequences(spec["sources"]), aug)
    if kind == "video_seg":
        if spec.get("layout") == "youtubevos":
            seqs = D.youtubevos_videos(_path(spec["root"]), spec.get("split", "train"))
        else:
            seqs = [s.annotated() for s in D.masked_videos(_path(spec["root"]), include=spec.get("include"),
                                                           exclude=spec.get("exclude", ()))]
        return D.VideoSegmentationSampler(name, seqs, aug, spec.get("max_instances", 8))
    if kind == "image_seg":
        layout = spec.get("format", "panoptic")
        if layout not in ("panoptic", "instances"):
            raise OAVMInputError(f"dataset {name}: format {layout!r}; use 'panoptic' or 'instances' (COCO's two "
                                 f"annotation downloads)")
        read = D.coco_panoptic if layout == "panoptic" else D.coco_instances
        images = read(_path(spec["root"]), spec.get("split", "train2017"), min_area=spec.get("min_area", 1024))
        return D.ImageSegmentationSampler(name, images, aug, spec.get("max_instances", 8))
    raise OAVMInputError(f"dataset {name}: unknown kind {kind!r}; use composite, real, video_seg or image_seg")


def step_generator(seed: int, stage: int, step: int, salt: int = 0) -> np.random.Generator:
    """The generator of one step: a pure function of its position, which is what makes resume exact."""
    return np.random.default_rng([seed, stage, step, salt])


def draw_batch(samplers: dict[str, D.ClipSampler], stage: StageConfig, seed: int, stage_index: int, step: int
               ) -> D.Batch:
    """The batch of ``step``: pick one sampler by weight (datasets alternate, Section 4.1), then its clips."""
    rng = step_generator(seed, stage_index, step)
    names = list(stage.datasets)
    weights = np.array([stage.datasets[n] for n in names], np.float64)
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    clips = [samplers[name].sample(step_generator(seed, stage_index, step, i + 1), stage.clip_length, stage.size)
             for i in range(stage.batch_size)]
    return D.collate(clips)


# ============================================================================================== model

def _in_module(param_name: str, prefix: str) -> bool:
    """Whether a parameter belongs to the module ``prefix`` names (``decoder`` holds ``decoder.decode3...``, not
    a sibling such as ``decoder2...``): the rule of ``train.freeze`` and ``lr_scales``."""
    return param_name == prefix or param_name.startswith(prefix + ".")


def load_matching(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str:
    """Load every tensor of ``weights`` whose name and shape the model has; say what was left out.

    A checkpoint of another variant (e.g. the dense pixel decoder, ``OAVMConfig.pixel_decoder``) initialises all
    the layers the variants share; the others keep their fresh initialisation."""
    own = model.state_dict()
    reshaped = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape)
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in reshaped},
                                                strict=False)
    fresh = sorted(set(missing) | set(reshaped))
    modules = sorted({k.rsplit(".", 2)[0] for k in fresh})  # e.g. oqg.pixel_decoder.conv0, set_prediction
    return (f"({len(own) - len(fresh)} of {len(own)} tensors loaded; freshly initialised: "
            f"{', '.join(modules) or 'none'}; {len(unexpected)} unused)")


def build_model(recipe: Recipe, log: Callable[[str], None]) -> torch.nn.Module:
    """The network with its training heads, initialised as the recipe says."""
    from oavm_service.model import OAVM, OAVMConfig

    config = OAVMConfig.from_dict({**recipe.model, "train_heads": True})
    torch.manual_seed(recipe.train.seed)
    model = OAVM(config)
    init = recipe.train.init
    if init == "rvm":
        from .import_rvm import load_rvm_weights
        load_rvm_weights(model)
        log("init: RVM pretrained backbone/ASPP/decoder/refiner (import_rvm.load_rvm_weights)")
    elif init not in ("random", ""):
        from oavm_service.checkpoint import load_checkpoint
        loaded, _ = load_checkpoint(_path(init))
        log(f"init: {init} " + load_matching(model, loaded.state_dict()))
    else:
        log("init: random")
    for name, p in model.named_parameters():
        if any(_in_module(name, f) for f in recipe.train.freeze):
            p.requires_grad_(False)
    if recipe.train.freeze:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"frozen: {', '.join(recipe.train.freeze)}; {trainable / 1e6:.2f} M trainable parameters")
    return model


@dataclass
class Predictions:
    alpha: torch.Tensor                    # (B, T, 1, H, W)
    fgmask_logits: torch.Tensor            # (B, T, 1, H, W)
    foreground: torch.Tensor | None        # (B, T, 3, H, W)
    set_layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B*T, Q, C+1), (B*T, Q, h, w)


def forward_clip(model: torch.nn.Module, batch: D.Batch) -> Predictions:
    """Run the network over a batch of clips the way inference does: the prompt on frame 0, memory after.

    ``OAVM.forward_clip`` returns the set-prediction outputs per frame and per layer; the loss wants them per
    layer over all frames, in batch-major order (clip 0 frames 0..T-1, clip 1 ...), like :func:`set_targets`.
    """
    out = model.forward_clip(batch.frames, batch.prompt)
    per_frame = out.get("aux") or []
    layers = []
    for layer in range(len(per_frame[0]) if per_frame else 0):
        logits = torch.stack([frame[layer]["pred_logits"] for frame in per_frame], 1).flatten(0, 1)
        masks = torch.stack([frame[layer]["pred_masks"] for frame in per_frame], 1).flatten(0, 1)
        layers.append((logits, masks))
    return Predictions(alpha=out["alpha"], fgmask_logits=out["fgmask_logits"], foreground=out.get("fgr"),
                       set_layers=layers)


def set_targets(batch: D.Batch, num_classes: int) -> list[SetTarget]:
    """One target set per frame (B*T, in batch-major order): the non-empty instance masks M_i, class 0."""
    targets = []
    for inst in batch.instances:                     # (T, K, H, W)
        for frame in inst:
            keep = frame.flatten(1).sum(1) > 0
            masks = frame[keep]
            targets.append(SetTarget(torch.zeros(masks.shape[0], dtype=torch.long, device=masks.device), masks))
    return targets


def compute_loss(pred: Predictions, batch: D.Batch, cfg: LossConfig, num_classes: int) -> WeightedLoss:
    """All supervision a batch has: matting (alpha clips), mask S_k and set prediction (always)."""
    parts: dict[str, torch.Tensor] = {}
    if batch.alpha is not None:
        parts |= matting_loss(pred.alpha.float(), batch.alpha, cfg,
                              pred_fgr=None if pred.foreground is None else pred.foreground.float(),
                              true_fgr=batch.foreground)
    parts |= segmentation_loss(pred.fgmask_logits.float(), batch.fgmask)
    if pred.set_layers:
        parts |= set_prediction_loss(pred.set_layers, set_targets(batch, num_classes), cfg)
    return total_loss(parts, cfg)


# ============================================================================================== optimisation

def param_groups(model: torch.nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms/biases/embeddings; modules in ``stage.lr_scales`` at their factor."""
    def scale_of(name: str) -> float:
        return next((f for prefix, f in stage.lr_scales.items() if _in_module(name, prefix)), 1.0)

    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "embed" in name or "norm" in name
        groups.setdefault((scale_of(name), no_decay), []).append(p)
    return [{"params": params, "lr": stage.lr * scale, "initial_lr": stage.lr * scale,
             "weight_decay": 0.0 if no_decay else stage.weight_decay}
            for (scale, no_decay), params in sorted(groups.items())]


def lr_lambda(stage: StageConfig) -> Callable[[int], float]:
    total, warmup = stage.total_steps(), stage.warmup_steps

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model, stage: StageConfig):
    optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    return optimizer, scheduler


def set_train_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


# ============================================================================================== logging

LOSS_TERMS = ("alpha_l1", "alpha_laplacian", "alpha_coherence", "fgr_l1", "fgr_coherence", "mask_bce", "mask_dice",
              "set_class", "set_mask", "set_dice")
CSV_FIELDS = ("step", "stage", "source", "lr", "grad_norm", "clips_per_s", *LOSS_TERMS, "total", "val_total")


class Logger:
    """Console + ``train.log`` lines, ``scalars.csv`` (fixed columns; a term a batch lacks is left empty) and
    TensorBoard when the ``tensorboard`` package happens to be installed."""

    def __init__(self, out: Path, resume_step: int | None):
        self.out = out
        self.tty = sys.stdout.isatty()
        self.log_file = open(out / "train.log", "a", encoding="utf-8")
        self.csv_path = out / "scalars.csv"
        self._fields = list(CSV_FIELDS)
        self._rows = self._kept_rows(resume_step)
        self._rewrite()
        try:  # optional: only when the tensorboard package is installed
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:
            self.tb = None

    def _kept_rows(self, resume_step: int | None) -> list[dict[str, str]]:
        """On resume, keep the rows up to the checkpoint; a fresh run starts a new file."""
        if resume_step is None or not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def _rewrite(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, self._fields, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(self._rows)

    def line(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)
        self.log_file.write(time.strftime("%H:%M:%S ") + text + "\n")
        self.log_file.flush()

    def progress(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()

    def scalars(self, row: dict[str, Any]) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self._fields, extrasaction="ignore", restval="").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.log_file.close()
        if self.tb is not None:
            self.tb.close()


def write_samples(path: Path, batch: D.Batch, pred: Predictions) -> None:
    """A PNG of the first clip: rows = frames, target alpha (or mask), predicted alpha, prompt over frame 0."""
    from oavm_service.io.images import write_image

    frames = batch.frames[0].detach().float().cpu().permute(0, 2, 3, 1).numpy()          # (T, H, W, 3)
    target = (batch.alpha if batch.alpha is not None else batch.fgmask)[0, :, 0].cpu().numpy()
    alpha = pred.alpha[0, :, 0].detach().float().cpu().numpy()
    grey = lambda a: np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
    prompt = batch.prompt[0, 0].cpu().numpy()
    overlay = frames[0] * 0.5 + np.stack([prompt, np.zeros_like(prompt), np.zeros_like(prompt)], -1) * 0.5
    blank = np.zeros_like(frames[0])
    rows = [np.concatenate(list(frames), 1), np.concatenate([grey(a) for a in target], 1),
            np.concatenate([grey(a) for a in alpha], 1),
            np.concatenate([overlay] + [blank] * (len(frames) - 1), 1)]
    write_image(path, np.concatenate(rows, 0).astype(np.float32), ["R", "G", "B"])


# ============================================================================================== checkpoints

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Position:
    stage: int = 0
    step: int = 0          # steps done in this stage
    global_step: int = 0
    best_val: float = float("inf")
    elapsed_s: float = 0.0


class WeightAverage:
    """Exponential moving average of the floating-point weights: ``avg <- d avg + (1 - d) w`` after every step.

    Validation and the exported checkpoints use the average (:meth:`applied`); the optimizer keeps training the
    raw weights. With one clip per step the raw weights jump from step to step (held-out J swung by +-0.08
    between validations 40 steps apart); the average is the usual remedy (Polyak averaging, as in many
    segmentation and matting trainers).
    """

    def __init__(self, model: torch.nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise OAVMInputError(f"train.ema_decay must be in (0, 1) (e.g. 0.99), or 0 for no average; got {decay}")
        self.decay = decay
        current = model.state_dict()
        self.average = {k: (state[k] if state and k in state else v).detach().clone().to(v.device)
                        for k, v in current.items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.average:
                self.average[k].lerp_(v.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The model with the averaged weights inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.average}
        model.load_state_dict(self.average, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)


def _averaged(model, average: WeightAverage | None):
    return average.applied(model) if average is not None else contextlib.nullcontext(model)


def save_training_state(path: Path, model, optimizer, scheduler, scaler, pos: Position, recipe: Recipe,
                        average: WeightAverage | None = None) -> None:
    """Everything ``--resume`` needs, written atomically (a kill mid-write keeps the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "ema": average.average if average is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": rng_state(), "position": dataclasses.asdict(pos), "recipe": recipe.source,
                "format": "oavm-train-state-1"}, tmp)
    os.replace(tmp, path)


def load_training_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OAVMInputError(f"--resume {path}: no such file; pass <out>/checkpoints/last.pt of an earlier run")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != "oavm-train-state-1":
        raise OAVMInputError(f"--resume {path}: not an OAVM training checkpoint (use <out>/checkpoints/last.pt, "
                             "not an inference .safetensors)")
    return state


def export_inference(model, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the fp16 inference checkpoint with ``checkpoint.save_checkpoint``: the same weights in a network
    built without the training-only set-prediction head (``train_heads = False``)."""
    from oavm_service.checkpoint import save_checkpoint
    from oavm_service.model import OAVM

    inference = OAVM(model.config.replace(train_heads=False))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("set_prediction.")}
    inference.load_state_dict(weights, strict=True)
    save_checkpoint(path, inference, meta=meta or {}, dtype=torch.float16)


# ============================================================================================== validation

@torch.no_grad()
def validate(model, samplers: dict[str, D.ClipSampler], names: list[str], recipe: Recipe, stage: StageConfig,
             device: torch.device, num_classes: int) -> float:
    """Mean loss on fixed clips (same seeds every time) of the validation datasets."""
    was_training = model.training
    model.eval()
    losses = []
    for n, name in enumerate(names):
        for i in range(recipe.train.val_clips):
            rng = step_generator(recipe.train.seed + 7919, 10_000 + n, i)
            batch = D.collate([samplers[name].sample(rng, recipe.train.val_clip_length, stage.size)]).to(device)
            losses.append(compute_loss(forward_clip(model, batch), batch, recipe.loss, num_classes).total.item())
    if was_training:
        set_train_mode(model, recipe.train.freeze_batchnorm)
    return float(np.mean(losses)) if losses else float("nan")


# ============================================================================================== training

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OAVMInputError("--device cuda: no CUDA device is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise OAVMInputError(f"--device must be cpu, cuda or auto (got {name!r})")
    return torch.device(name)


def train(recipe: Recipe, out: Path, *, device: torch.device, resume: Path | None = None,
          max_minutes: float | None = None, max_steps: int | None = None) -> list[float]:
    """Run (or continue) the recipe; returns the total loss of every step run in this call.

    ``max_steps`` stops after that many global steps (tests); ``max_minutes`` stops cleanly with a checkpoint.
    """
    out.mkdir(parents=True, exist_ok=True)
    state = load_training_state(resume) if resume else None
    pos = Position(**state["position"]) if state else Position()
    logger = Logger(out, pos.global_step if state else None)
    log = logger.line
    cfg = recipe.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model = build_model(recipe, log).to(device)
    num_classes = model.config.num_classes
    if state:
        model.load_state_dict(state["model"])
    average = None
    if cfg.ema_decay:
        average = WeightAverage(model, cfg.ema_decay, state.get("ema") if state else None)
        if state and not state.get("ema"):
            log("the resumed checkpoint has no weight average: it starts from the resumed weights")
    use_amp = device.type == "cuda" and cfg.amp
    losses: list[float] = []
    start = time.monotonic()
    stopped = False
    samplers: dict[str, D.ClipSampler] = {}
    pack = open_data_pack(recipe)

    for stage_index in range(pos.stage, len(recipe.stages)):
        stage = recipe.stages[stage_index]
        total = stage.total_steps()
        needed = list(stage.datasets) + [v for v in recipe.validation if v not in stage.datasets]
        samplers = {n: build_sampler(n, recipe.datasets[n], recipe, stage.size, log, pack) for n in needed}
        optimizer, scheduler = make_optimizer(model, stage)
        scaler = torch.amp.GradScaler("cuda") if use_amp else None
        if state and stage_index == pos.stage:
            if pos.step > 0:  # a checkpoint written at a stage boundary holds the previous stage's optimizer
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            log(f"resumed {resume} at stage {stage.name} step {pos.step}/{total} (global {pos.global_step})")
        else:
            pos.step = 0
        log(f"stage {stage.name}: {total} steps, {stage.batch_size} x {stage.clip_length} frames at "
            f"{stage.size[1]}x{stage.size[0]}, lr {stage.lr:g}, wd {stage.weight_decay:g}, datasets "
            f"{stage.datasets}, device {device}{' (AMP)' if use_amp else ''}")
        set_train_mode(model, cfg.freeze_batchnorm)
        window_start, window_clips = time.monotonic(), 0
        draw = functools.partial(draw_batch, samplers, stage, cfg.seed, stage_index)
        # a batch is a pure function of its position, so batches drawn ahead are those drawn in line (exact resume)
        prefetch = ReadAhead(draw, range(pos.step, total)) \
            if (device.type == "cuda" if cfg.prefetch is None else cfg.prefetch) else None
        while pos.step < total:
            if max_steps is not None and pos.global_step >= max_steps:
                stopped = True
                break
            if max_minutes is not None and (time.monotonic() - start) / 60.0 >= max_minutes:
                log(f"--max-minutes {max_minutes:g} reached: stopping with a checkpoint")
                stopped = True
                break
            batch = (prefetch.next() if prefetch is not None else draw(pos.step)).to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                pred = forward_clip(model, batch)
            loss = compute_loss(pred, batch, recipe.loss, num_classes)
            if not math.isfinite(loss.parts["total"]):
                raise FloatingPointError(f"loss is {loss.parts['total']} at step {pos.global_step}: lower the lr "
                                         "or resume from the last checkpoint with another seed")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss.total).backward()
                scaler.unscale_(optimizer)
            else:
                loss.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(model)
            pos.step += 1
            pos.global_step += 1
            losses.append(loss.parts["total"])
            window_clips += stage.batch_size
            row = {"step": pos.global_step, "stage": stage.name, "lr": optimizer.param_groups[-1]["lr"],
                   "grad_norm": float(grad_norm), "source": batch.sources[0], **loss.parts}
            now = time.monotonic()
            rate = window_clips / max(now - window_start, 1e-9)
            bar = _bar(pos.step, total)
            logger.progress(f"{stage.name} {bar} {pos.step}/{total} loss {loss.parts['total']:.4f} "
                            f"{rate:.2f} clips/s")
            if pos.global_step % cfg.log_every == 0 or pos.step == total:
                row["clips_per_s"] = rate
                logger.scalars(row)
                log(f"{stage.name} step {pos.step}/{total} (global {pos.global_step}) loss {loss.parts['total']:.4f} "
                    f"[{_fmt_parts(loss.parts)}] lr {row['lr']:.2e} {rate:.2f} clips/s "
                    f"{(now - start) / 60:.1f} min")
                window_start, window_clips = now, 0
            if cfg.sample_every and pos.global_step % cfg.sample_every == 0:
                write_samples(out / "samples" / f"step_{pos.global_step:06d}.png", batch, pred)
            if cfg.val_every and recipe.validation and pos.global_step % cfg.val_every == 0:
                with _averaged(model, average):
                    _validate_and_keep_best(model, samplers, recipe, stage, device, num_classes, pos, out, log,
                                            logger)
            if cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0:
                save_training_state(out / "checkpoints" / "last.pt", model, optimizer, scheduler, scaler, pos, recipe,
                                    average)
        if prefetch is not None:
            prefetch.close()
        pos.elapsed_s += time.monotonic() - start
        if stopped:
            save_training_state(out / "checkpoints" / "last.pt", model, optimizer, scheduler, scaler, pos, recipe,
                                average)
            break
        pos.stage, pos.step = stage_index + 1, 0
        state = None
        save_training_state(out / "checkpoints" / "last.pt", model, optimizer, scheduler, scaler, pos, recipe,
                            average)
    if not stopped:
        with _averaged(model, average):
            if cfg.val_every and recipe.validation and all(n in samplers for n in recipe.validation):
                _validate_and_keep_best(model, samplers, recipe, recipe.stages[-1], device, num_classes, pos, out,
                                        log, logger)
            export_inference(model, out / "final.safetensors", _meta(recipe, pos))
        log(f"done: {out / 'final.safetensors'} (fp16)")
    logger.close()
    return losses


def _validate_and_keep_best(model, samplers, recipe, stage, device, num_classes, pos: Position, out: Path, log,
                            logger: Logger) -> None:
    val = validate(model, samplers, recipe.validation, recipe, stage, device, num_classes)
    better = val < pos.best_val
    log(f"validation loss {val:.4f} at step {pos.global_step}" + (" (best so far: exported best.safetensors)"
                                                                   if better else f" (best {pos.best_val:.4f})"))
    logger.scalars({"step": pos.global_step, "stage": stage.name, "val_total": val})
    if better:
        pos.best_val = val
        export_inference(model, out / "best.safetensors", _meta(recipe, pos) | {"val_loss": val})


def _meta(recipe: Recipe, pos: Position) -> dict[str, Any]:
    """What an exported checkpoint says about its training (``checkpoint.read_checkpoint_header``)."""
    stage = recipe.stages[min(pos.stage, len(recipe.stages) - 1)].name
    return {"trained_with": "oavm train", "recipe": recipe.name, "init": recipe.train.init,
            "global_step": pos.global_step, "stage": stage, "stages_completed": pos.stage,
            "ema_decay": recipe.train.ema_decay,
            "recipe_source": recipe.source}


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _fmt_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in parts.items() if k != "total")


# ============================================================================================== CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oavm train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe file, e.g. configs/local.toml or configs/paper.toml")
    parser.add_argument("--resume", help="continue exactly from <out>/checkpoints/last.pt")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly (with a checkpoint) after this long")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda if available)")
    parser.add_argument("--out", help="output folder (default runs/<recipe name>)")
    parser.add_argument("--data-pack", help="read the recipe's data from a folder made by `oavm pack-data`")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config)
        if args.data_pack:
            recipe.train.data_pack = str(Path(args.data_pack).resolve())
        out = Path(args.out) if args.out else REPO / "runs" / recipe.name
        train(recipe, out, device=resolve_device(args.device), resume=Path(args.resume) if args.resume else None,
              max_minutes=args.max_minutes)
    except OAVMInputError as e:
        print(f"oavm train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
