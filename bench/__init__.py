# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM benchmarks: ``python -m bench`` (or ``python3 build.py bench``).

One run prints one table and records it in ``bench/results/`` as JSON and as a PNG plot:

* ``speed``    frames per second, latency p50/p95 and peak memory of ``ClipSession.step`` per resolution and device
* ``memory``   peak memory against clip length (the engine keeps a fixed memory: first frame + last frame)
* ``service``  the same frames through the real ZeroMQ service and ``shared.client`` against the engine in-process
* ``rvm``      RVM's shipped ONNX model (onnxruntime, recurrent) on the same frames, device and downsample ratio
* ``profile``  where a step's time goes: backbone, PFE, OQG, OGCR, decoder, refiner (``torch.profiler``)

See ``docs/performance.md`` for how to read the table and what was measured.
"""
