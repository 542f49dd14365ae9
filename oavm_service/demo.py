# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm demo``: matte the bundled sample clip (samples/judo) and write something to look at.

It runs the same code path as a farm job (:mod:`oavm_service.batch`) with the shipped checkpoint, then adds a
preview: a contact sheet PNG (frame | matte | composite over a checkerboard, one row per sampled frame) and an
MP4 of the composite. The composite uses the network's foreground estimate F of Eq. 1, ``alpha * F + (1 - alpha)
* checkerboard``, so colour spill from the old background shows up as it would in a comp.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from oavm_service.batch import BatchConfig, BatchJob, EngineStepper, KeyMask, Layer, exit_code
from oavm_service.errors import OAVMError
from oavm_service.io import Plate
from oavm_service.io.images import write_image
from oavm_service.io.movies import write_movie

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "judo"
SHEET_ROWS = 6
SHEET_CELL_WIDTH = 320


def checkerboard(height: int, width: int, square: int = 16) -> np.ndarray:
    """The usual transparency checkerboard, (H, W, 3) float32, display-referred greys."""
    yy, xx = np.mgrid[0:height, 0:width]
    light = ((yy // square + xx // square) % 2).astype(np.float32)
    return np.repeat((0.45 + 0.3 * light)[..., None], 3, axis=-1)


def composite(rgb: np.ndarray, layer: Layer) -> np.ndarray:
    """Eq. 1 with a checkerboard as the new background: alpha * F + (1 - alpha) * B."""
    foreground = layer.foreground if layer.foreground is not None else rgb
    alpha = layer.alpha[..., None]
    return alpha * foreground + (1.0 - alpha) * checkerboard(*rgb.shape[:2])


def resize(pixels: np.ndarray, width: int) -> np.ndarray:
    """Filtered downscale with OpenImageIO (keeps the aspect ratio)."""
    h, w = pixels.shape[:2]
    height = max(1, round(h * width / w))
    src = oiio.ImageBuf(np.ascontiguousarray(pixels, dtype=np.float32))
    dst = oiio.ImageBufAlgo.resize(src, roi=oiio.ROI(0, width, 0, height, 0, 1, 0, pixels.shape[2]))
    return np.asarray(dst.get_pixels(oiio.FLOAT)).reshape(height, width, pixels.shape[2])


def contact_sheet(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cell_width: int = SHEET_CELL_WIDTH,
                  gap: int = 4) -> np.ndarray:
    """Rows of (frame, matte, composite) cells on a dark background, (H, W, 3) float32."""
    cells = [[resize(c if c.ndim == 3 else np.repeat(c[..., None], 3, -1), cell_width) for c in row] for row in rows]
    cell_h = cells[0][0].shape[0]
    sheet = np.full((gap + len(rows) * (cell_h + gap), gap + 3 * (cell_width + gap), 3), 0.1, np.float32)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            y, x = gap + r * (cell_h + gap), gap + c * (cell_width + gap)
            sheet[y:y + cell_h, x:x + cell_width] = cell
    return sheet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oavm demo", description="Matte the bundled sample clip and write a preview.")
    p.add_argument("--checkpoint", help="model checkpoint (.safetensors); default: the shipped one")
    p.add_argument("--output-dir", default="demo_output", help="where the results go (default demo_output/)")
    p.add_argument("--sample", default=str(SAMPLE), help="a clip folder with frames/*.jpg and masks/00000.png")
    p.add_argument("--frames", type=int, help="only the first N frames (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    return p


def run(args: argparse.Namespace) -> int:
    from oavm_service.engine import Engine

    sample, out = Path(args.sample), Path(args.output_dir)
    frames_dir = sample / "frames"
    numbers = sorted(int(p.stem) for p in frames_dir.glob("*.jpg") if p.stem.isdigit())
    if not numbers:
        raise FileNotFoundError(f"no sample frames in {frames_dir}; pass --sample DIR (frames/00000.jpg ...)")
    if args.frames:
        numbers = numbers[: args.frames]
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    print(f"oavm demo: {len(numbers)} frames of {sample.name} with {engine.checkpoint_info.get('path')} "
          f"on {engine.device} ({engine.precision})", flush=True)

    collected: list[tuple[np.ndarray, Layer]] = []

    def keep(plate: Plate, layers: dict[str, Layer]) -> None:
        collected.append((plate.network_rgb, layers["matte"]))

    config = BatchConfig(
        input=str(frames_dir / "#####.jpg"), output=str(out / "mattes" / f"{sample.name}.#####.exr"),
        masks=[KeyMask("matte", str(sample / "masks" / "00000.png"), numbers[0])],
        frames=numbers, overwrite=True, state_every=0)
    BatchJob(config, stepper_factory=lambda: EngineStepper(engine, None, foreground=True), on_frame=keep).run()

    comps = [np.clip(composite(rgb, layer), 0.0, 1.0) for rgb, layer in collected]
    picks = np.unique(np.linspace(0, len(collected) - 1, min(SHEET_ROWS, len(collected))).round().astype(int))
    sheet = contact_sheet([(collected[i][0], collected[i][1].alpha, comps[i]) for i in picks])
    sheet_path = write_image(out / f"{sample.name}_contact_sheet.png", sheet, ["R", "G", "B"])
    movie_path, codec = write_movie(out / f"{sample.name}_composite.mp4",
                                    (np.rint(c * 255).astype(np.uint8) for c in comps), fps=24)
    print(f"mattes:        {Path(config.output).parent}/ (EXR: matte.A, matte.fgmask)")
    print(f"contact sheet: {sheet_path} (frame | matte | composite over a checkerboard)")
    print(f"movie:         {movie_path} ({codec})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (OAVMError, OSError, RuntimeError) as exc:
        print(f"oavm demo: error: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)
