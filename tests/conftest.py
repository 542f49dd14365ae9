# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared fixtures: small, seeded, generic. Real models and real data only (no stubs)."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pytest


def pytest_configure(config) -> None:
    """Few torch threads: the suite shares small machines, and oversubscribed OpenMP threads spin instead of
    working (measured: one training step 2 s with 1 thread, 55 s with 2 on a busy 2-core machine)."""
    try:
        import torch
    except ImportError:  # the Blender test environment has no torch
        return
    torch.set_num_threads(int(os.environ.get("OAVM_TEST_THREADS", max(1, min(4, (os.cpu_count() or 2) // 2)))))


def moving_disc_clip(frames: int = 3, height: int = 64, width: int = 64, *, seed: int = 0, radius: float = 0.25,
                     step: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged coloured disc moving over uniform noise: (T, H, W, 3) float32 frames and (T, H, W) alphas.

    The alpha has a ~2-pixel soft edge, so the matte is not just a binary mask; the composite follows Eq. 1.
    """
    rng = np.random.default_rng(seed)
    background = rng.random((height, width, 3), dtype=np.float32)
    colour = rng.uniform(0.2, 0.9, 3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = radius * min(height, width)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.3, 0.45) * width
    images, alphas = [], []
    for t in range(frames):
        dist = np.hypot(yy - cy, xx - (cx + t * step * width))
        alpha = np.clip((r - dist) / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)
        images.append(alpha[..., None] * colour + (1 - alpha[..., None]) * background)
        alphas.append(alpha)
    return np.stack(images).astype(np.float32), np.stack(alphas)


@pytest.fixture
def make_clip() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory of synthetic clips (see :func:`moving_disc_clip`)."""
    return moving_disc_clip


def calibrated_tiny_model(seed: int = 0, **config_changes):
    """A seeded, randomly initialised tiny OAVM in eval mode (fp32, CPU) with calibrated batch-norm statistics.

    With default running statistics (mean 0, var 1) a random network's activations collapse layer by layer (x4
    ends near 1e-9), so its output would ignore the image and the mask. Re-estimating the statistics on two
    synthetic clips gives a random network whose outputs respond to its inputs, as a trained one does.
    """
    import torch

    from oavm_service.model import OAVM, OAVMConfig

    torch.manual_seed(seed)
    model = OAVM(OAVMConfig.tiny(**config_changes))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for s in range(2):
            images, alphas = moving_disc_clip(2, 64, 96, seed=100 + s)
            frames = torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0)
            model.forward_clip(frames, torch.from_numpy(alphas[:1] > 0.5).float().unsqueeze(0))
    return model.eval()


@pytest.fixture
def tiny_model():
    """See :func:`calibrated_tiny_model`."""
    return calibrated_tiny_model()
