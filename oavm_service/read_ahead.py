# SPDX-License-Identifier: GPL-3.0-or-later
"""Work beside the network on a worker thread: items produced one ahead and handed out in order (the farm batch's
next plate while this frame is in the network, the trainer's next batch while this step runs on the GPU). Results
written behind in order are ``shared.write_behind`` (the plug-ins use it too)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

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
