# SPDX-License-Identifier: GPL-3.0-or-later
"""How long a 1080p frame takes to reach the GPU from pageable memory (what the engine does now) and through a
page-locked staging buffer (a memcpy, then DMA). Needs CUDA. ``python -m bench.h2d_probe``

Measured on an H100 machine (docs/performance.md, "The service hop on a GPU"): a float16 frame 0.98 ms pageable
against 0.18 + 0.25 ms staged, so staging would save about 0.5 ms of a 6 ms 1080p step, in-process and in the
service alike. Not built yet: it wants a GPU session to measure the engine with it.
"""
from __future__ import annotations

import time

import numpy as np
import torch


def _median_ms(fn, n: int = 60) -> str:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return f"{1000 * np.median(times[5:]):.2f} ms"


def main() -> None:
    half = np.random.rand(1080, 1920, 3).astype(np.float16)
    byte = (np.random.rand(1080, 1920, 3) * 255).astype(np.uint8)
    pinned = torch.empty(half.shape, dtype=torch.float16, pin_memory=True)
    print("1080p float16 frame (12.4 MB): pageable H2D", _median_ms(lambda: torch.from_numpy(half).to("cuda")))
    print("  memcpy into pinned", _median_ms(lambda: pinned.copy_(torch.from_numpy(half))))
    print("  pinned H2D", _median_ms(lambda: pinned.to("cuda", non_blocking=True)))
    print("  memcpy + pinned H2D", _median_ms(
        lambda: pinned.copy_(torch.from_numpy(half)).to("cuda", non_blocking=True)))
    print("1080p uint8 frame (6.2 MB): pageable H2D", _median_ms(lambda: torch.from_numpy(byte).to("cuda")))


if __name__ == "__main__":
    main()
