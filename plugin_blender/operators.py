# SPDX-License-Identifier: GPL-3.0-or-later
"""The two operators: "Matte Clip" and "Re-prompt at Current Frame".

Both run the same job two ways:
* from the UI (``invoke``): in a worker thread, with the window manager's progress bar and the status bar;
  Esc cancels after the frame in flight, keeping every matte already written;
* from a script or ``blender -b shot.blend --python-expr "import bpy; bpy.ops.oavm.matte_clip()"``
  (``execute``): synchronously, printing one line per frame.

Every failure (service down, clip missing, mask of the wrong size, bad frame range) becomes
``self.report({'ERROR'}, ...)`` and ``{'CANCELLED'}``; an artist never sees a traceback.
"""
from __future__ import annotations

import bpy

from . import jobs, properties
from .core import service
from .core.job import JobProgress, run_job
from .core.worker import JobThread


def _print_progress(progress: JobProgress) -> None:
    print(f"OAVM: frame {progress.frame} written ({progress.done}/{progress.total}, {progress.seconds:.1f} s)",
          flush=True)


class _OAVMJobOperator:
    """Shared by both operators; a subclass says how to prepare its job."""
    bl_options = {"REGISTER"}

    _timer = None

    def prepare(self, context: bpy.types.Context) -> jobs.PreparedJob:
        raise NotImplementedError

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.scene is not None and hasattr(context.scene, "oavm")

    def _fail(self, exc: BaseException, settings: service.ServiceSettings) -> set[str]:
        self.report({"ERROR"}, service.describe_error(exc, settings))
        return {"CANCELLED"}

    # ---------------------------------------------------------------------------------------- headless
    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = properties.preferences(context)
        try:
            prepared = self.prepare(context)
        except Exception as exc:  # noqa: BLE001 - reported, never a traceback
            return self._fail(exc, settings)
        client = None
        try:
            client = service.connect(settings)
            result = run_job(client, prepared.job, progress=_print_progress)
        except KeyboardInterrupt:
            jobs.cleanup(prepared)
            self.report({"WARNING"}, f"OAVM: interrupted; the mattes written so far stay in {prepared.job.output_dir}")
            return {"CANCELLED"}
        except Exception as exc:  # noqa: BLE001
            jobs.cleanup(prepared)
            return self._fail(exc, settings)
        finally:
            if client is not None:
                client.close()
        try:
            self.report({"INFO"}, jobs.apply_result(prepared, result))
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc, settings)
        return {"FINISHED"}

    # ---------------------------------------------------------------------------------------- interactive
    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        settings = properties.preferences(context)
        prepared = None
        try:
            prepared = self.prepare(context)
            thread = JobThread(prepared.job, lambda: service.connect(settings),
                               lambda exc: service.describe_error(exc, settings))
            jobs.start(prepared, thread)
        except Exception as exc:  # noqa: BLE001
            if prepared is not None:
                jobs.cleanup(prepared)
            return self._fail(exc, settings)
        wm = context.window_manager
        wm.progress_begin(0, len(prepared.job.frames))
        self._timer = wm.event_timer_add(0.2, window=context.window)
        wm.modal_handler_add(self)
        self._status(context, f"OAVM: matting {prepared.job.clip_id} ... (Esc to cancel)")
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        job = jobs.running()
        if job is None:
            return self._finish(context, ("ERROR", "OAVM: the job was stopped (add-on disabled?)"))
        if job.outcome is not None:
            return self._finish(context, job.outcome)
        if event.type == "ESC" and event.value == "PRESS":
            job.thread.cancel()
            self._status(context, "OAVM: cancelling after the frame in flight ...")
            return {"RUNNING_MODAL"}
        if event.type == "TIMER" and job.thread.last_progress is not None and not job.thread.cancel_requested:
            p = job.thread.last_progress
            self._status(context, f"OAVM: {job.prepared.job.clip_id} frame {p.frame} ({p.done}/{p.total}) "
                                  f"- Esc to cancel")
        return {"PASS_THROUGH"}

    def _finish(self, context: bpy.types.Context, outcome: tuple[str, str]) -> set[str]:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        self._status(context, None)
        level, message = outcome
        self.report({level}, message)
        return {"CANCELLED"} if level == "ERROR" else {"FINISHED"}

    @staticmethod
    def _status(context: bpy.types.Context, text: str | None) -> None:
        if context.workspace is not None:
            context.workspace.status_text_set(text)


class OAVM_OT_matte_clip(_OAVMJobOperator, bpy.types.Operator):
    """Matte the clip with the OAVM service from its first-frame mask; writes an EXR sequence and the node group"""
    bl_idname = "oavm.matte_clip"
    bl_label = "Matte Clip"

    def prepare(self, context: bpy.types.Context) -> jobs.PreparedJob:
        return jobs.prepare_matte(context.scene)


class OAVM_OT_reprompt(_OAVMJobOperator, bpy.types.Operator):
    """Send the corrected mask at the current frame and re-matte from this frame to the end of the range"""
    bl_idname = "oavm.reprompt"
    bl_label = "Re-prompt at Current Frame"

    def prepare(self, context: bpy.types.Context) -> jobs.PreparedJob:
        return jobs.prepare_reprompt(context.scene)


CLASSES = (OAVM_OT_matte_clip, OAVM_OT_reprompt)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    jobs.register()


def unregister() -> None:
    jobs.unregister()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
