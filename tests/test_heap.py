# SPDX-License-Identifier: GPL-3.0-or-later
"""heap.py: with the settings the ``oavm`` command applies, a large block freed by one step is reused by the next
without the kernel zeroing fresh pages (page faults counted in a fresh process), and a closed clip's kept memory
goes back to the system."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One "step" makes four 40 MB maps, as a network's layers do at 4K, and frees them. Each is over glibc's largest
# automatic mmap threshold (32 MB), so without the settings each is a fresh mapping whose 10,240 pages the kernel
# zeroes again on every step (the engine: 33,000 faults a 4K frame; 8,000-14,000 at 512x288, where smaller maps
# are trimmed off the heap top - an outcome that varies from run to run, so not the one tested). torch, not
# numpy: numpy asks for huge pages on large arrays, which fault 512 times less often.
CHURN = r"""
import json, resource, sys
import torch
from oavm_service.heap import keep_freed_memory, release_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def step():
    x = torch.ones(10 << 20)
    y = x + 1
    z = y * 2
    return float((z - x)[-1])

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

for _ in range(10):   # warm-up: the heap grows to what a step needs
    step()
before = faults()
for _ in range(10):
    step()
per_step = (faults() - before) / 10
rss_kept = rss_kib()
released = release_freed_memory()
print(json.dumps({"kept": kept, "faults_per_step": per_step, "rss_kept_kib": rss_kept,
                  "released": released, "rss_after_kib": rss_kib()}))
"""


def _churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults and glibc's malloc are Linux's")
def test_freed_blocks_are_reused_without_page_faults_and_released_on_request():
    plain, kept = _churn("plain"), _churn("keep")
    pages = 4 * (40 << 20) // 4096
    assert plain["faults_per_step"] > 0.9 * pages, plain        # every step maps and zeroes 160 MB again
    assert kept["kept"] is True
    assert kept["faults_per_step"] < 0.1 * pages, kept          # the freed maps are reused (0-1,024 seen)
    assert kept["rss_kept_kib"] > plain["rss_kept_kib"] + 150 * 1024, kept   # ... because it stayed resident
    assert kept["released"] is True                             # and goes back when asked
    assert kept["rss_after_kib"] < plain["rss_kept_kib"] + 20 * 1024, kept


def test_closing_a_clip_gives_the_kept_memory_back(tmp_path, monkeypatch):
    """The service's store calls release_freed_memory when it drops a clip it held (close_clip), not otherwise."""
    import torch

    from oavm_service import server
    from oavm_service.engine import Engine
    from oavm_service.model import OAVM, OAVMConfig

    torch.manual_seed(0)
    engine = Engine(OAVM(OAVMConfig.tiny()).eval(), device="cpu")
    store = server.ClipStore(engine, tmp_path, max_clips=2)
    calls = []
    monkeypatch.setattr(server, "release_freed_memory", lambda: calls.append(1) or True)
    store.put(server.Clip("a", engine.new_session(), direction=1, next_frame=1, want_foreground=False))
    assert store.remove("missing") is False and calls == []
    assert store.remove("a") is True and calls == [1]
