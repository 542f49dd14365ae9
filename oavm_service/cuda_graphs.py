# SPDX-License-Identifier: GPL-3.0-or-later
"""A clip's steady-state frame step recorded once as a CUDA graph and replayed for every later frame.

At 1080p with a 0.25 downsample ratio the network does a few GFLOPs in several hundred small kernels, so an eager
GPU step is mostly Python and launch overhead. A CUDA graph replays the same kernels with one launch. It fixes
everything the kernels were recorded with: the frame's size and dtype, the downsample ratio, the objects and
whether the foreground colour is computed - the session records again when one of those changes - and the input
and output tensors, which live at fixed addresses: :meth:`GraphedStep.__call__` copies the frame and the objects'
memory into the recorded inputs and returns the recorded outputs, which the next replay overwrites (the session
copies them to the host and clones the next state before that).

Prompt frames stay eager: they are rare and write the long-term memory, which a replay would not.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .model import ObjectState

WARMUP_STEPS = 2   # eager runs on a side stream before recording (lazy initialisation, cuDNN/cuBLAS choices)

StepFn = Callable[[torch.Tensor, ObjectState], tuple]


class GraphedStep:
    """``step(frame, state)`` recorded for this frame's shape/dtype and this state's objects."""

    def __init__(self, step: StepFn, frame: torch.Tensor, state: ObjectState,
                 autocast: Callable[..., contextlib.AbstractContextManager]) -> None:
        if frame.device.type != "cuda":
            raise ValueError("CUDA graphs need tensors on a CUDA device")
        self.frame = frame.clone()
        self.state = ObjectState(**{k: t.clone() for k, t in state.tensors().items()})
        # autocast's weight-cast cache would keep tensors made during recording alive outside the graph's pool
        with autocast(cache_enabled=False):
            side = torch.cuda.Stream(device=frame.device)
            side.wait_stream(torch.cuda.current_stream(frame.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step(self.frame, self.state)
            torch.cuda.current_stream(frame.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(self.frame, self.state)

    def __call__(self, frame: torch.Tensor, state: ObjectState) -> tuple:
        """Replay on ``frame`` and ``state`` (same shapes as recorded); returns the recorded outputs."""
        self.frame.copy_(frame, non_blocking=True)
        for name, t in state.tensors().items():
            getattr(self.state, name).copy_(t, non_blocking=True)
        self.graph.replay()
        return self.outputs
