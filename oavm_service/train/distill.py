# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm distill``: move a trained network to OQG's light pixel decoder by teaching it the dense one's outputs.

    oavm distill --teacher runs/local/best.safetensors --config configs/local.toml \
                 --out oavm_service/checkpoints/oavm_mnv3.safetensors [--stage stage5] [--steps 1000]

Why: OQG's pixel decoder ran dense 3x3 convolutions (128 -> 128) in the first trained networks; at stride 4 that
one convolution was 1.36 of the network's 6.1 GMACs for a 512x288 frame. ``OAVMConfig.pixel_decoder =
"separable"`` (the default now) makes its three convolutions depthwise 3x3 + pointwise 1x1. Retraining the whole
recipe for that is hours of CPU; instead the student is the teacher's network with the light pixel decoder:
every tensor the two share is copied (backbone, PFE, OQG's transformer, OGCR, decoder), and only the pixel decoder
is trained, to reproduce the teacher's F_P0, F_P1, F_P2 and mask features on frames drawn from one stage of the
teacher's recipe (squared error relative to the teacher's mean square, so each output counts the same). Backbone
features are computed once, by the shared backbone. The student's checkpoint is ready to use; the shipped one was
made this way from the last stage of ``configs/local.toml`` (docs/model_card.md).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from oavm_service.errors import OAVMInputError

OUTPUTS = ("F_P0", "F_P1", "F_P2", "mask_features")


@dataclass
class DistillResult:
    student: torch.nn.Module           # OAVM with the student config, eval mode
    first_error: dict[str, float]      # relative squared error per output at the first step
    last_error: dict[str, float]       # ... averaged over the last (up to) 20 steps
    steps: int
    seconds: float


def _pixel_outputs(pixel_decoder: torch.nn.Module, x4: torch.Tensor, f3: torch.Tensor, f2: torch.Tensor
                   ) -> list[torch.Tensor]:
    scales, mask_features = pixel_decoder(x4, f3, f2)
    return [*scales, mask_features]


def relative_errors(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
    """|s - t|^2 / |t|^2 per output (mean over the batch's elements)."""
    return [(s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8) for s, t in zip(student, teacher)]


def make_student(teacher: torch.nn.Module, config) -> tuple[torch.nn.Module, str]:
    """The network of ``config`` initialised from every tensor of ``teacher`` it shares (name and shape)."""
    from oavm_service.model import OAVM

    from .loop import load_matching

    student = OAVM(config)
    return student, load_matching(student, teacher.state_dict())


def distill_pixel_decoder(teacher: torch.nn.Module, config, frames: Callable[[int], torch.Tensor], *,
                          steps: int, lr: float = 1e-3, device: torch.device = torch.device("cpu"),
                          log: Callable[[str], None] = print) -> DistillResult:
    """Train the student's pixel decoder on ``frames(step)`` -> (N, 3, H, W) in 0..1 (H, W multiples of 16)."""
    if steps < 1:
        raise OAVMInputError(f"steps must be at least 1 (got {steps})")
    teacher = teacher.to(device).eval()
    student, loaded = make_student(teacher, config)
    log(f"student {config.pixel_decoder} pixel decoder from the teacher's {teacher.config.pixel_decoder} one "
        + loaded)
    student = student.to(device).eval()  # group norm has no running statistics: eval mode trains the same
    params = list(student.oqg.pixel_decoder.parameters())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    first: dict[str, float] = {}
    recent: list[list[float]] = []
    start = time.monotonic()
    for step in range(steps):
        x = frames(step).to(device)
        with torch.no_grad():
            feats = teacher.encode_frame(x)
            target = _pixel_outputs(teacher.oqg.pixel_decoder, feats.x4, feats.f3, feats.f2)
        errors = relative_errors(_pixel_outputs(student.oqg.pixel_decoder, feats.x4, feats.f3, feats.f2), target)
        loss = torch.stack(errors).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        values = [e.item() for e in errors]
        if step == 0:
            first = dict(zip(OUTPUTS, values))
        recent = (recent + [values])[-20:]
        if step % 10 == 0 or step == steps - 1:
            rate = (step + 1) / max(time.monotonic() - start, 1e-6)
            log(f"distill {step + 1}/{steps}  relative error " + "  ".join(
                f"{n} {v:.3f}" for n, v in zip(OUTPUTS, values)) + f"  {rate:.1f} steps/s")
    last = {n: sum(r[i] for r in recent) / len(recent) for i, n in enumerate(OUTPUTS)}
    for p in student.parameters():
        p.requires_grad_(True)
    return DistillResult(student.eval(), first, last, steps, time.monotonic() - start)


def recipe_frames(recipe, stage_name: str, log: Callable[[str], None]) -> Callable[[int], torch.Tensor]:
    """Frames of one stage of the recipe, drawn as ``oavm train`` draws its clips (seeded by the stage's index and
    the step, so a run is repeatable)."""
    from . import loop

    names = [s.name for s in recipe.stages]
    if stage_name not in names:
        raise OAVMInputError(f"the recipe has no stage {stage_name!r}; its stages are {', '.join(names)}")
    index = names.index(stage_name)
    stage = recipe.stages[index]
    samplers = {n: loop.build_sampler(n, recipe.datasets[n], recipe, stage.size, log) for n in stage.datasets}

    def frames(step: int) -> torch.Tensor:
        return loop.draw_batch(samplers, stage, recipe.train.seed, index, step).frames.flatten(0, 1)

    return frames


def main(argv: list[str] | None = None) -> int:
    from oavm_service.model.config import PIXEL_DECODERS

    parser = argparse.ArgumentParser(prog="oavm distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="trained checkpoint (.safetensors)")
    parser.add_argument("--config", required=True, help="the recipe that trained it (configs/local.toml): its "
                                                        "datasets give the frames")
    parser.add_argument("--stage", help="the recipe stage whose data to draw (default: the last)")
    parser.add_argument("--pixel-decoder", default="separable", choices=PIXEL_DECODERS,
                        help="the student's pixel decoder (default: separable)")
    parser.add_argument("--out", required=True, help="student checkpoint to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    args = parser.parse_args(argv)
    from oavm_service.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    from . import loop
    try:
        recipe = loop.load_recipe(args.config)
        if recipe.train.num_threads:
            torch.set_num_threads(recipe.train.num_threads)
        teacher, meta = load_checkpoint(args.teacher)
        if teacher.config.pixel_decoder == args.pixel_decoder:
            raise OAVMInputError(f"{args.teacher} already has the {args.pixel_decoder} pixel decoder: nothing to "
                                 f"distil")
        config = teacher.config.replace(pixel_decoder=args.pixel_decoder)
        stage = args.stage or recipe.stages[-1].name
        frames = recipe_frames(recipe, stage, print)
        result = distill_pixel_decoder(teacher, config, frames, steps=args.steps, lr=args.lr,
                                       device=loop.resolve_device(args.device))
    except (OAVMInputError, CheckpointError) as e:
        print(f"oavm distill: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, result.student.cpu(), dtype=torch.float16, meta={
        "made_by": "oavm distill", "teacher": str(args.teacher), "teacher_meta": meta, "recipe": recipe.name,
        "stage": stage, "steps": result.steps, "lr": args.lr,
        "relative_error": result.last_error})
    print(f"wrote {out}: {result.steps} steps in {result.seconds / 60:.1f} min, relative error "
          + ", ".join(f"{n} {result.first_error[n]:.3f} -> {result.last_error[n]:.3f}" for n in OUTPUTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
