# SPDX-License-Identifier: GPL-3.0-or-later
"""Files written behind the network, in order, on one worker thread: the farm batch's last matte while the next
frame is in the network, the Nuke gizmo's cache matte while the service mattes the next frame.

Here in ``shared/`` because the plug-ins vendor only this package (Python 3.7 syntax, for Nuke 13)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Mapping, Optional, Tuple

from .protocol import is_loopback


def core_is_free(status: Mapping[str, Any], endpoint: str) -> bool:
    """Whether writing behind pays, for a client of the service at ``endpoint`` (its ``status()``): only where the
    service leaves this machine's cores to the writer - it runs on a GPU, or on another machine. A service on this
    machine's CPU takes every core for its network; on the 2-core test machine a writer beside it gained nothing,
    for the farm batch and for the Nuke gizmo alike (docs/performance.md, items 14 and 18)."""
    return str(status.get("device")) != "cpu" or not is_loopback(endpoint)


class WriteBehind:
    """``submit(write, *args, then=done)`` runs ``write(*args)`` on one worker thread, in order, while the caller goes
    on; ``done(result)`` runs later on the caller's thread, in the same order, once the write has finished. At most
    ``depth`` writes wait at once: a submit beyond that first finishes the oldest (so the frames they hold are
    bounded). A write that failed raises its error from the submit or ``flush`` that finishes it. ``depth=0``
    writes at once on the caller's thread (for a machine with no core to spare: the writer would only slow the
    network down there).

    Leaving the ``with`` block finishes every write; after an error in the block the writes already submitted still
    complete (their frames were computed: they are kept), and their own errors do not hide the first one.
    """

    def __init__(self, depth: int = 2) -> None:
        if depth < 0:
            raise ValueError("WriteBehind needs depth >= 0")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oavm-write-behind") if depth else None
        self._pending: Deque[Tuple[Future, Optional[Callable[[Any], None]]]] = deque()

    def submit(self, write: Callable[..., Any], *args: Any, then: Optional[Callable[[Any], None]] = None) -> None:
        if self._pool is None:
            result = write(*args)
            if then is not None:
                then(result)
            return
        while len(self._pending) >= self.depth:
            self._finish_oldest()
        self._pending.append((self._pool.submit(write, *args), then))

    def flush(self) -> None:
        """Finish every submitted write (e.g. before a saved state claims the frames written)."""
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, then = self._pending.popleft()
        result = future.result()
        if then is not None:
            then(result)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type: Optional[type], *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        while self._pending:                 # an error is on its way out: keep what was computed, quietly
            try:
                self._finish_oldest()
            except Exception:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
