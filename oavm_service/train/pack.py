# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm pack-data``: a recipe's training data as one small, movable folder (for a run on a GPU machine).

    oavm pack-data --config configs/local.toml --out packs/local      # here, where ../shared/data and RVM are
    oavm train --config configs/local_gpu.toml --data-pack packs/local --device cuda     # there

A recipe reads its real footage through the RVM teacher cache (:class:`data.TeacherCache`: frames, object labels
and pseudo-alpha at the training size) and its backgrounds as image files. A pack holds exactly that, at each
stage's training size and nothing larger: the cached sequences the recipe selects (hold-outs stay out), the
background frames cover-cropped to the training size, JPEG for colour (quality 95; the cached uint8 frames change
by a few levels) and PNG for labels and each object's alpha (exact). The recipe ``configs/local.toml`` packs into
26 MB, against 80 MB of source footage plus 58 MB of teacher cache, and the machine that trains from it needs
neither ``../shared/data`` nor the RVM model.

A pack is keyed by the recipe's own strings (each source's ``root`` and ``name``, each background's ``root`` and
``frames``), so the same recipe file works on both machines; what the pack lacks is a clear error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from oavm_service.errors import OAVMInputError
from oavm_service.io import images

from . import data as D

FORMAT = "oavm-data-pack"
VERSION = 1
MANIFEST = "pack.json"
JPEG_QUALITY = 95


def _size_tag(size: D.Size) -> str:
    return f"{size[1]}x{size[0]}"


def _source_key(item: dict[str, Any], size: D.Size) -> str:
    """A teacher/real source as the recipe spells it: its root and dataset name, at one training size."""
    return f"{item['root']}|{item.get('name', Path(item['root']).name)}|{_size_tag(size)}"


def _background_key(item: dict[str, Any], size: D.Size) -> str:
    frames = item.get("frames")
    return f"{item['root']}|{'' if frames is None else f'{frames[0]}:{frames[1]}'}|{_size_tag(size)}"


def _select(names: list[str], item: dict[str, Any]) -> list[str]:
    include, exclude = item.get("include"), set(item.get("exclude", ()))
    missing = sorted(set(include or ()) - set(names))
    if missing:
        raise OAVMInputError(f"the data pack has no sequence(s) {', '.join(missing)} of {item['root']}; make the "
                             f"pack again with `oavm pack-data` from this recipe")
    return [n for n in names if (include is None or n in include) and n not in exclude]


# ================================================================================================== reading

class DataPack:
    """A folder written by :func:`write_pack`; stands in for the teacher cache and the background folders."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise OAVMInputError(f"{self.folder} is not a data pack (no {MANIFEST}); make one with "
                                 f"`oavm pack-data --config RECIPE --out {self.folder}`")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise OAVMInputError(f"{path}: not a version-{VERSION} OAVM data pack; make it again with this "
                                 f"version's `oavm pack-data`")
        self.sources: dict[str, dict[str, Any]] = manifest["sources"]
        self.backgrounds: dict[str, list[list[str]]] = manifest["backgrounds"]
        self._read: dict[str, D.CachedSequence] = {}    # a sequence several datasets use is decoded once

    def sequences(self, item: dict[str, Any], size: D.Size) -> list[D.CachedSequence]:
        """The cached sequences of one recipe source (``include``/``exclude`` applied), as the cache gives them."""
        entry = self.sources.get(_source_key(item, size))
        if entry is None:
            raise OAVMInputError(f"the data pack {self.folder} has no source {item['root']} at {_size_tag(size)}; "
                                 f"make it again with `oavm pack-data` from the recipe you train")
        return [self._read_sequence(entry[name]) for name in _select(sorted(entry), item)]

    def background_videos(self, item: dict[str, Any], size: D.Size) -> list[list[Path]]:
        videos = self.backgrounds.get(_background_key(item, size))
        if videos is None:
            raise OAVMInputError(f"the data pack {self.folder} has no backgrounds {item['root']} at "
                                 f"{_size_tag(size)}; make it again with `oavm pack-data` from the recipe you train")
        return [[self.folder / p for p in video] for video in videos]

    def _read_sequence(self, entry: dict[str, Any]) -> D.CachedSequence:
        if entry["path"] not in self._read:
            self._read[entry["path"]] = self._decode(entry)
        return self._read[entry["path"]]

    def _decode(self, entry: dict[str, Any]) -> D.CachedSequence:
        base = self.folder / entry["path"]
        n, ids = entry["frames"], entry["object_ids"]
        frames = np.stack([D.read_rgb(base / "frames" / f"{t:05d}.jpg") for t in range(n)])
        labels = np.stack([images.read_image(base / "labels" / f"{t:05d}.png").pixels[..., 0] for t in range(n)])
        alpha = np.stack([np.stack([images.read_image(base / "alpha" / f"{t:05d}_{k}.png").pixels[..., 0]
                                    for k in range(len(ids))]) for t in range(n)])
        return D.finish_cached(D.CachedSequence(entry["name"], _uint8(frames), _uint8(labels), _uint8(alpha), ids))


def _uint8(values: np.ndarray) -> np.ndarray:
    """8-bit pixels come back as 0..1 floats; the cache keeps their uint8 codes (labels are ids, alpha 0..255)."""
    return np.rint(values * 255).astype(np.uint8)


# ================================================================================================== writing

def write_pack(recipe, out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pack what ``recipe`` (a :class:`loop.Recipe`) trains and validates on into ``out``; returns the manifest.

    Sequences come through the recipe's teacher cache (computed here where missing, which needs RVM).
    """
    from .loop import _path

    out = Path(out)
    cache = D.TeacherCache(_path(recipe.train.cache_dir), teacher_scale=recipe.train.teacher_scale)
    used = {name for stage in recipe.stages for name in stage.datasets} | set(recipe.validation)
    sizes = sorted({tuple(stage.size) for stage in recipe.stages})
    sources: dict[str, dict[str, Any]] = {}
    backgrounds: dict[str, list[list[str]]] = {}

    def pack_source(item: dict[str, Any], size: D.Size) -> None:
        key = _source_key(item, size)
        dataset = item.get("name", Path(item["root"]).name)
        entry = sources.setdefault(key, {})
        for seq in D.masked_videos(_path(item["root"]), include=item.get("include"), exclude=item.get("exclude", ())):
            if seq.name in entry:
                continue
            cached = cache.load_raw(dataset, seq, size, log=log)
            rel = f"sequences/{dataset}/{seq.name}_{_size_tag(size)}"
            _write_sequence(out / rel, cached)
            entry[seq.name] = {"name": seq.name, "path": rel, "frames": int(cached.frames.shape[0]),
                               "object_ids": cached.object_ids}
            log(f"packed {dataset}/{seq.name} at {_size_tag(size)}: {cached.frames.shape[0]} frames, "
                f"{len(cached.object_ids)} object(s)")

    def pack_backgrounds(item: dict[str, Any], size: D.Size) -> None:
        key = _background_key(item, size)
        if key in backgrounds:
            return
        frames = tuple(item["frames"]) if "frames" in item else None
        videos = D.background_videos(_path(item["root"]), frames=frames)
        packed = []
        for video in videos:
            rel = f"backgrounds/{len(backgrounds):03d}_{len(packed):03d}_{_size_tag(size)}"
            for t, path in enumerate(video):
                _write_jpeg(out / rel / f"{t:05d}.jpg", D.load_rgb(path, size))
            packed.append([f"{rel}/{t:05d}.jpg" for t in range(len(video))])
        backgrounds[key] = packed
        log(f"packed backgrounds {item['root']} at {_size_tag(size)}: {sum(map(len, packed))} frames")

    for name in sorted(used):
        spec = recipe.datasets[name]
        kind = spec.get("kind")
        for size in sizes:
            if kind == "composite":
                fg = spec.get("foregrounds", {})
                if fg.get("kind") != "teacher":
                    raise OAVMInputError(f"dataset {name}: {fg.get('kind')} foregrounds cannot be packed (a pack "
                                         f"holds teacher cut-outs of sample footage); train on them in place")
                for item in fg["sources"]:
                    pack_source(item, size)
                for item in spec.get("backgrounds", []):
                    if item.get("kind") != "videos":
                        raise OAVMInputError(f"dataset {name}: background {item.get('kind')} cannot be packed "
                                             f"(background videos can)")
                    pack_backgrounds(item, size)
            elif kind == "real":
                for item in spec["sources"]:
                    pack_source(item, size)
            else:
                raise OAVMInputError(f"dataset {name}: kind {kind!r} cannot be packed (composite and real can)")
    manifest = {"format": FORMAT, "version": VERSION, "recipe": recipe.name, "sources": sources,
                "backgrounds": backgrounds}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_jpeg(path: Path, rgb_uint8: np.ndarray) -> None:
    images.write_8bit(path, rgb_uint8, ["R", "G", "B"], jpeg_quality=JPEG_QUALITY)


def _write_sequence(folder: Path, seq: D.CachedSequence) -> None:
    for t in range(seq.frames.shape[0]):
        name = f"{t:05d}"
        _write_jpeg(folder / "frames" / f"{name}.jpg", seq.frames[t])
        images.write_8bit(folder / "labels" / f"{name}.png", seq.labels[t][..., None], ["Y"])
        for k in range(seq.alpha.shape[1]):                                  # one PNG per object: PNG has <= 4
            images.write_8bit(folder / "alpha" / f"{name}_{k}.png", seq.alpha[t, k][..., None], ["Y"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ================================================================================================== CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oavm pack-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the recipe whose data to pack, e.g. configs/local.toml")
    parser.add_argument("--out", required=True, help="folder to write (train with --data-pack FOLDER)")
    args = parser.parse_args(argv)
    from .loop import load_recipe
    try:
        recipe = load_recipe(args.config)
        manifest = write_pack(recipe, args.out)
    except OAVMInputError as e:
        print(f"oavm pack-data: {e}", file=sys.stderr)
        return 2
    n_seq = sum(len(v) for v in manifest["sources"].values())
    print(f"wrote {args.out}: {n_seq} sequences, {len(manifest['backgrounds'])} background sets, "
          f"{folder_bytes(Path(args.out)) / 1e6:.1f} MB. Train with: oavm train --config {args.config} "
          f"--data-pack {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
