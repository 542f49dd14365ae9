"""``python3 build.py dist``: build every distributable into dist/ (Blender extension zip, Nuke plug-in zip).

Each plug-in's builder vendors the repo's ``shared/`` package (the one protocol definition) into its zip; no copy
of it is kept in ``plugin_blender/`` or ``plugin_nuke/``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import dist_blender  # noqa: E402
import dist_nuke  # noqa: E402


def main(argv: list[str]) -> int:
    out = ROOT / "dist"
    out.mkdir(exist_ok=True)
    for builder in (dist_blender, dist_nuke):
        path = builder.build(out)
        print(f"[dist] {path.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
