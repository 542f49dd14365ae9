# SPDX-License-Identifier: GPL-3.0-or-later
"""Work beside the network on worker threads: items produced one ahead and handed out in order (the farm batch's
next plate while this frame is in the network, the trainer's next batch while this step runs on the GPU), and
results written behind in order (the batch's last matte while the next frame is in the network)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

Key = TypeVar("Key")
Item = TypeVar("Item")


class ReadAhead(Generic[Key, Item]):
    """``read(key)`` for each of ``keys`` in order, one ahead on a worker thread. ``next()`` returns the items in
    order; a read that failed raises its error when its item is asked for, as a direct read would. Only the worker
    calls ``read`` while this is open (a movie decoder is not thread-safe)."""

    def __init__(self, read: Callable[[Key], Item], keys: Sequence[Key]) -> None:
        self._read, self._keys, self._index = read, keys, 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oavm-read-ahead")
        self._ahead: Future | None = self._pool.submit(read, keys[0]) if keys else None

    def next(self) -> Item:
        current, self._index = self._ahead, self._index + 1
        if current is None:
            raise IndexError("ReadAhead: every item was read")
        self._ahead = self._pool.submit(self._read, self._keys[self._index]) \
            if self._index < len(self._keys) else None
        return current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ReadAhead[Key, Item]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self._pending: deque[tuple[Future, Callable[[Any], None] | None]] = deque()

    def submit(self, write: Callable[..., Any], *args: Any, then: Callable[[Any], None] | None = None) -> None:
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

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
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
