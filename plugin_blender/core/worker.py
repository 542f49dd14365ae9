# SPDX-License-Identifier: GPL-3.0-or-later
"""Run a matting job off Blender's main thread; the main thread polls for what happened.

``bpy`` must only be used from the main thread, and a network round trip per frame would freeze the UI, so the
job (network + file I/O only) runs in a daemon thread and reports through a queue. A ``bpy.app.timers`` callback
on the main thread calls :meth:`JobThread.poll` and applies the events (progress bar, node group, reports).
The ZeroMQ client is created *inside* the thread, since ZeroMQ sockets must stay in the thread that made them.
"""
from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from .job import JobProgress, JobResult, MatteJob, run_job


@dataclass
class JobEvent:
    """``kind`` is "progress" (payload JobProgress), "done" (JobResult) or "error" (a message for the artist)."""
    kind: str
    payload: Any


class JobThread:
    """One job in one daemon thread: ``start()``, then ``poll()`` from the main thread until ``finished``."""

    def __init__(self, job: MatteJob, make_client: Callable[[], Any],
                 describe_error: Callable[[BaseException], str] = str):
        self.job = job
        self._make_client = make_client
        self._describe_error = describe_error
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"oavm-job-{job.clip_id}", daemon=True)
        self.finished = False          # set by poll() once the "done" or "error" event has been handed out
        self.last_progress: JobProgress | None = None

    def start(self) -> "JobThread":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop after the frame in flight; frames already written stay."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def poll(self) -> list[JobEvent]:
        """The events since the last poll, oldest first (never blocks)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event.kind == "progress":
                self.last_progress = event.payload
            else:
                self.finished = True
            events.append(event)
        return events

    def _run(self) -> None:
        client = None
        try:
            client = self._make_client()
            result: JobResult = run_job(client, self.job, progress=lambda p: self._events.put(JobEvent("progress", p)),
                                        cancel=self._cancel)
            self._events.put(JobEvent("done", result))
        except Exception as exc:  # noqa: BLE001 - every failure must reach the artist as a report, not a traceback
            message = self._describe_error(exc)
            if not message:
                message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._events.put(JobEvent("error", message))
        finally:
            if client is not None:
                client.close()
