# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixtures of the Blender suite (run in .venv-blender: real bpy 5.x, no torch).

* ``plates``: a short synthetic clip (6 frames, 64x48 PNGs of a disc moving over noise) on disk;
* ``service``: a real OAVM service on loopback with a tiny random checkpoint (tests/helpers/live_service.py runs
  it in the service environment), shared by the whole session because starting it costs seconds;
* ``extension_zip``: the extension built by tools/dist_blender.py, once per session.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # plugin_blender.core, shared, tests.helpers, tools

from tests.blender.synthetic_clip import FRAMES, direct_mattes, disc_frames, rect_mask, write_png  # noqa: E402


@pytest.fixture(scope="session")
def plates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/plate_0001.png`` ... ``plate_0006.png``; returns the folder."""
    folder = tmp_path_factory.mktemp("plates")
    for i, rgb in enumerate(disc_frames(), start=1):
        write_png(folder / f"plate_{i:04d}.png", rgb)
    return folder


# Most tiny random models answer 0 everywhere; seed 3's mattes differ between frames and pixels (0.15-0.20), so
# comparing the add-on's EXRs with the service's replies also catches a wrong frame order or mapping. (No random
# tiny model reacts much to the prompt mask; mask placement is tested against Blender's own Mask node.)
CHECKPOINT_SEED = 3


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory):
    """The endpoint of a live OAVM service (tiny random checkpoint, CPU) for the whole session."""
    from tests.helpers.live_service import live_service, make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("service")
    checkpoint = make_tiny_checkpoint(folder / "tiny.safetensors", seed=CHECKPOINT_SEED)
    with live_service(folder, checkpoint=checkpoint) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def direct_rect(service, plates) -> dict[int, dict[str, np.ndarray]]:
    """The reference: the service's mattes of frames 1-6 prompted with ``{"disc": rect_mask()}`` at frame 1,
    through the client directly (shared by both test files; each frame costs a model step)."""
    return direct_mattes(service, plates, "reference-rect", list(range(1, FRAMES + 1)), {"disc": rect_mask()})


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/oavm_blender-<version>.zip built into a temporary folder (wheels come from .cache/wheels)."""
    sys.path.insert(0, str(REPO / "tools"))
    import dist_blender

    return dist_blender.build(tmp_path_factory.mktemp("dist"))
