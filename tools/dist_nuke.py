# SPDX-License-Identifier: GPL-3.0-or-later
"""Build the Nuke plug-in zip: plugin_nuke/ + the repo's shared/ + pyzmq and msgpack for every Nuke Python.

Nuke brings its own Python (Nuke 13: 3.7, 14: 3.9, 15: 3.10, 16: 3.11) without pyzmq or msgpack, so their wheels
are fetched with ``pip download --only-binary=:all: --no-deps --platform ... --python-version ...`` into the
git-ignored ``.cache/wheels/`` (once; later builds are offline) and unpacked into
``vendor/py<X.Y>-<os>-<arch>/`` folders, which init.py puts on sys.path by ``sys.version_info`` and platform (see
plugin_nuke/oavm_nuke/bootstrap.py). numpy is not vendored: the client needs the host's own numpy.

Called by tools/dist.py (``python3 build.py dist``) as ``build(out_dir) -> Path``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin_nuke"
WHEEL_CACHE = ROOT / ".cache" / "wheels"
TOP = "OAVM"                          # the folder inside the zip that goes on NUKE_PATH

# Python of each Nuke release -> the newest pyzmq/msgpack with wheels for it
PINS = {
    "3.7": {"pyzmq": "26.2.0", "msgpack": "1.0.5"},     # Nuke 13
    "3.9": {"pyzmq": "27.3.0", "msgpack": "1.1.2"},     # Nuke 14
    "3.10": {"pyzmq": "27.3.0", "msgpack": "1.2.4"},    # Nuke 15
    "3.11": {"pyzmq": "27.3.0", "msgpack": "1.2.4"},    # Nuke 16
}
# vendor folder platform -> pip --platform tags that run there (oldest glibc / macOS first)
PLATFORMS = {
    "linux-x86_64": ["manylinux2010_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64",
                     "manylinux_2_28_x86_64"],
    "windows-x86_64": ["win_amd64"],
    "macos-x86_64": ["macosx_10_9_x86_64", "macosx_10_15_x86_64", "macosx_10_9_universal2",
                     "macosx_10_15_universal2", "macosx_11_0_x86_64"],
    "macos-arm64": ["macosx_11_0_arm64", "macosx_10_9_universal2", "macosx_10_15_universal2",
                    "macosx_11_0_universal2"],
}
# Nuke 13 shipped for Intel Macs only: no arm64 wheels of its Python exist
SKIP = {("3.7", "macos-arm64")}


@dataclass(frozen=True)
class Target:
    python: str          # "3.11"
    platform: str        # "linux-x86_64"

    @property
    def folder(self) -> str:
        """Must equal bootstrap.vendor_folder_name() on that Nuke."""
        return "py%s-%s" % (self.python, self.platform)


def all_targets() -> list:
    return [Target(py, plat) for py in PINS for plat in PLATFORMS if (py, plat) not in SKIP]


def _version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "0"


def fetch_wheels(target: Target, cache: Path = WHEEL_CACHE) -> list:
    """The target's wheels, downloaded into ``cache/<folder>/`` unless they are there already."""
    where = cache / target.folder
    wheels = []
    for package, version in sorted(PINS[target.python].items()):
        found = sorted(where.glob("%s-%s-*.whl" % (package, version)))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
                   "--only-binary=:all:", "--no-deps", "--python-version", target.python,
                   "--implementation", "cp", "--dest", str(where), "%s==%s" % (package, version)]
            for tag in PLATFORMS[target.platform]:
                cmd += ["--platform", tag]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(where.glob("%s-%s-*.whl" % (package, version)))
            if done.returncode != 0 or not found:
                raise SystemExit("dist_nuke: could not fetch %s %s for Python %s on %s:\n%s\nThe build needs PyPI "
                                 "once; or put the wheel into %s yourself." % (package, version, target.python,
                                                                               target.platform,
                                                                               done.stderr.strip(), where))
        wheels.append(found[-1])
    return wheels


def _add_tree(zf: zipfile.ZipFile, src: Path, arc: str) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            _write(zf, path.read_bytes(), "%s/%s" % (arc, path.relative_to(src).as_posix()))


def _write(zf: zipfile.ZipFile, data: bytes, name: str) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))   # reproducible zips
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def build(out_dir: Path, targets: list | None = None, cache: Path = WHEEL_CACHE) -> Path:
    """Write ``out_dir/oavm-nuke-<version>.zip`` and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (PLUGIN / "shared").exists():
        raise SystemExit("dist_nuke: plugin_nuke/shared exists; remove it, the build vendors the repo's shared/")
    targets = all_targets() if targets is None else targets
    zip_path = out_dir / ("oavm-nuke-%s.zip" % _version())
    tmp = Path(tempfile.mkstemp(suffix=".zip", dir=out_dir)[1])
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            _add_tree(zf, PLUGIN, TOP)
            for path in sorted((ROOT / "shared").glob("*.py")):
                _write(zf, path.read_bytes(), "%s/shared/%s" % (TOP, path.name))
            _write(zf, (ROOT / "LICENSE").read_bytes(), "%s/LICENSE" % TOP)
            _write(zf, (ROOT / "docs" / "nuke.md").read_bytes(), "%s/README.md" % TOP)
            for target in targets:
                for wheel in fetch_wheels(target, cache):
                    with zipfile.ZipFile(wheel) as whl:
                        for name in sorted(whl.namelist()):
                            if not name.endswith("/"):
                                _write(zf, whl.read(name), "%s/vendor/%s/%s" % (TOP, target.folder, name))
        shutil.move(str(tmp), zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


if __name__ == "__main__":
    print(build(ROOT / "dist"))
