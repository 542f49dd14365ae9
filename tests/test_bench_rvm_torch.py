# SPDX-License-Identifier: GPL-3.0-or-later
"""The bench's torch RVM (bench.rvm_torch) is RVM: frame by frame, with its recurrent state, it gives the ONNX
model's alpha. Checked at downsample ratios below 1: at ratio 1 RVM's torch code skips its guided filter, which
the ONNX export (traced with a ratio below 1) always runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.common import SampleClip
from bench.rvm import RecurrentRVM
from bench.rvm_torch import TorchRVM


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_torch_rvm_follows_the_onnx_model_over_frames(ratio):
    clip = SampleClip(320, 192)
    onnx = RecurrentRVM(["CPUExecutionProvider"], ratio, threads=2)
    model = TorchRVM.from_onnx()
    hidden: list = [None] * 4
    diffs = []
    for i in range(4):
        frame = clip.frame(i)
        expected = onnx.step(frame)
        with torch.inference_mode():
            x = torch.from_numpy(frame).float().div(255.0).permute(2, 0, 1).unsqueeze(0)
            alpha, hidden = model(x, hidden, ratio)
        diffs.append(np.abs(alpha[0, 0].numpy() - expected).max())
    # the recurrent state matters: without it frame 3 differs (checked below), with it the models agree
    assert max(diffs) < 1e-4, diffs
    with torch.inference_mode():
        stateless, _ = model(x, [None] * 4, ratio)
    assert np.abs(stateless[0, 0].numpy() - expected).max() > 1e-3
