# SPDX-License-Identifier: GPL-3.0-or-later
"""Build the Blender extension: ``dist/oavm_blender-<version>.zip`` (called by tools/dist.py, ``build.py dist``).

The zip is a Blender 4.2+ extension (installable with "Install from Disk" or
``blender --command extension install-file -r user_default oavm_blender-<version>.zip``):

* ``plugin_blender/`` as the add-on (no ``__pycache__``), with its manifest written for this build:
  ``version`` from pyproject.toml, ``wheels`` and ``platforms``;
* the repo's ``shared/`` package vendored as ``shared/`` inside the add-on (it imports itself relatively);
* pyzmq and msgpack as wheels for every platform Blender runs on (Linux, Windows, macOS; x64 and arm64 where the
  projects publish them) and Blender's Pythons (3.11: Blender 4.2-5.0; 3.13: Blender 5.1+). They are fetched once
  with ``pip download --only-binary=:all: --no-deps --platform ... --python-version ...`` into ``.cache/wheels``
  (git-ignored) and reused by later builds, so only the first build needs the package index.

The archive is reproducible: sorted entries with a fixed timestamp.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin_blender"
SHARED = ROOT / "shared"
CACHE = ROOT / ".cache" / "wheels"
PINS_FILE = ROOT / "requirements" / "blender.txt"
BUNDLED = ("pyzmq", "msgpack")          # what shared/ needs besides numpy (which Blender ships)
PYTHONS = ("3.11", "3.13")              # Blender 4.2-5.0 run Python 3.11; Blender 5.1 runs 3.13
REQUIRED_PYTHON = "3.11"                # a platform is listed only when these wheels exist for it
# Blender platform -> pip --platform tags, best first (pip takes the most specific wheel that fits any of them)
PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "linux-arm64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    "windows-x64": ("win_amd64",),
    "windows-arm64": ("win_arm64",),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_9_x86_64", "macosx_10_15_universal2", "macosx_10_9_universal2"),
    "macos-arm64": ("macosx_11_0_arm64", "macosx_10_15_universal2", "macosx_10_9_universal2"),
}
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP = re.compile(r"(^|/)(__pycache__/|.*\.pyc$|\.)")


@dataclass
class WheelSet:
    """The wheels of one (Blender platform, Python) pair, or why there are none."""
    platform: str
    python: str
    wheels: list[Path]
    problem: str | None = None


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def pinned_versions() -> dict[str, str]:
    """``{name: version}`` of the bundled packages, from the exact pins in requirements/blender.txt."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", PINS_FILE.read_text(), flags=re.M))
    missing = [name for name in BUNDLED if name not in pins]
    if missing:
        raise SystemExit(f"[dist] {PINS_FILE} pins no version of {missing}; add e.g. pyzmq==27.3.0")
    return {name: pins[name] for name in BUNDLED}


def _cached(folder: Path, name: str, version: str) -> list[Path]:
    return sorted(folder.glob(f"{name}-{version}-*.whl"))


def fetch_wheels(platform: str, python: str, pins: dict[str, str], cache: Path = CACHE) -> WheelSet:
    """The pinned wheels for one platform and Python: from the cache, else downloaded into it."""
    folder = cache / platform / f"cp{python.replace('.', '')}"
    have = {name: _cached(folder, name, version) for name, version in pins.items()}
    wanted = [f"{name}=={pins[name]}" for name, files in have.items() if not files]
    if wanted:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
               "--only-binary=:all:", "--no-deps", "--python-version", python, "--implementation", "cp",
               "--dest", str(folder), *(arg for tag in PLATFORMS[platform] for arg in ("--platform", tag)), *wanted]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            return WheelSet(platform, python, [], f"{' '.join(wanted)}: {last}")
        have = {name: _cached(folder, name, version) for name, version in pins.items()}
    return WheelSet(platform, python, [files[-1] for files in have.values()])


def collect_wheels(pins: dict[str, str], cache: Path = CACHE) -> tuple[list[Path], list[str], list[str]]:
    """Every wheel to bundle, the Blender platforms they cover, and notes on what is unavailable."""
    wheels: dict[str, Path] = {}
    platforms: list[str] = []
    notes: list[str] = []
    for platform in PLATFORMS:
        sets = [fetch_wheels(platform, python, pins, cache) for python in PYTHONS]
        for wheel_set in sets:
            if wheel_set.problem:
                notes.append(f"no wheels for {platform} / Python {wheel_set.python}: {wheel_set.problem}")
            for wheel in wheel_set.wheels:
                wheels.setdefault(wheel.name, wheel)
        if any(s.python == REQUIRED_PYTHON and not s.problem for s in sets):
            platforms.append(platform)
    if not platforms:
        raise SystemExit("[dist] no pyzmq/msgpack wheels could be fetched for any platform. The first build needs "
                         f"the package index (pip download); later builds reuse {cache}.\n" + "\n".join(notes))
    return [wheels[name] for name in sorted(wheels)], platforms, notes


# ------------------------------------------------------------------------------------------------ manifest
def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        if len(value) <= 3:
            return "[" + ", ".join(_toml_value(v) for v in value) + "]"
        return "[\n" + "".join(f"  {_toml_value(v)},\n" for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the manifest")


def manifest_text(source: dict, *, version: str, wheels: list[str], platforms: list[str]) -> str:
    """The built manifest: the source manifest with version/wheels/platforms set and its [build] table dropped."""
    data = {key: value for key, value in source.items() if key != "build"}
    data.update(version=version, wheels=wheels, platforms=platforms)
    lines = ["# Written by tools/dist_blender.py from plugin_blender/blender_manifest.toml; do not edit."]
    tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items() if key not in tables]
    for key, table in tables.items():
        lines += ["", f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ zip
def _sources(folder: Path, prefix: str) -> list[tuple[str, Path]]:
    """(name in the zip, file) for the Python package in ``folder``; caches, hidden files and the manifest skipped."""
    items = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not _SKIP.search(rel) and rel != "blender_manifest.toml":
            items.append((prefix + rel, path))
    return items


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def build(out_dir: Path, *, cache: Path = CACHE) -> Path:
    """Write ``out_dir/oavm_blender-<version>.zip`` and return its path."""
    version = project_version()
    wheels, platforms, notes = collect_wheels(pinned_versions(), cache)
    for note in notes:
        print(f"[dist] note: {note}", flush=True)
    source = tomllib.loads((PLUGIN / "blender_manifest.toml").read_text())
    manifest = manifest_text(source, version=version, wheels=[f"./wheels/{w.name}" for w in wheels],
                             platforms=platforms)
    entries = {"blender_manifest.toml": manifest.encode()}
    entries.update({name: path.read_bytes() for name, path in _sources(PLUGIN, "")})
    entries.update({name: path.read_bytes() for name, path in _sources(SHARED, "shared/")})
    entries.update({f"wheels/{w.name}": w.read_bytes() for w in wheels})
    entries["LICENSE"] = (ROOT / "LICENSE").read_bytes()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"oavm_blender-{version}.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(entries):
            _write(archive, name, entries[name])
    tmp.replace(target)
    return target


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "dist"
    print(f"[dist] {build(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
