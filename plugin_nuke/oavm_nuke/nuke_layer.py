# SPDX-License-Identifier: GPL-3.0-or-later
"""The only module that imports ``nuke``: the gizmo's buttons, its Write-node renders and its cached-matte Read.

Everything else is in plain modules (analysis, cache, frames, frameranges, clipid) that run and are tested without
Nuke. Nuke calls used here, from the Nuke Python API reference: ``nuke.root().name()``, ``nuke.frame()``,
``nuke.thisNode()``, ``Node.fullName() / input(i) / frameRange() / node(name) / begin() / end()``,
``nuke.nodes.Write()``, ``Knob.value() / setValue()``, ``nuke.execute(node, first, last, incr)``,
``nuke.delete(node)``, ``nuke.ProgressTask(title).setMessage / setProgress / isCancelled``, ``nuke.message``.

Why frames are rendered through Write nodes: Nuke's Python has no fast way to read an image (``nuke.sample``
reads one pixel per call - minutes per HD frame); a Write node renders a frame in Nuke's own threads, the service
then reads the file (``matte_file``, a service on this machine) or the gizmo reads it with ``exr.py`` and sends
the pixels (a remote service, the first frame and re-prompts, which carry a mask).
"""
from __future__ import annotations

import os
import shlex
from typing import Optional

import nuke

from . import gizmo as G
from .analysis import (AnalysisError, AnalysisReport, AnalysisSettings, Analyzer, FrameSource, Progress,
                       is_local_endpoint)
from .cache import CacheError, CacheLayout, cache_status
from .clipid import ClipIdError, default_clip_id, validate_clip_id
from .exr import ExrError
from .frameranges import FrameRangeError, compact, parse_frame_ranges

# Write-node knobs for the renders the service reads, set in this order (file_type first: it creates the exr knobs).
# Zip in 16-line chunks: the gizmo's own reader (Python, for every frame's digest) reads a 1080p render in 104 ms
# instead of 189 ms with one-line chunks (docs/performance.md, item 15)
WRITE_KNOBS = (("file_type", "exr"), ("datatype", "16 bit half"), ("compression", "Zip (16 scanlines)"),
               ("create_directories", True))
USER_ERRORS = (AnalysisError, CacheError, ClipIdError, ExrError, FrameRangeError)


# ---------------------------------------------------------------------------------------------- settings

def _text(node, knob: str) -> str:
    return str(node[knob].value() or "").strip()


def script_path() -> str:
    return nuke.root().name()


def default_frame_range(node) -> str:
    """The Source input's frame range (``Node.frameRange()``), e.g. ``1001-1100``."""
    source = node.input(0)
    if source is None:
        raise AnalysisError("connect the plate to the OAVM node's Source input")
    r = source.frameRange()
    return "%d-%d" % (r.first(), r.last())


def clip_id_of(node) -> str:
    """The ``clip_id`` knob, or the default (script + node) that run_analysis then stores in it, so it stays."""
    return validate_clip_id(_text(node, "clip_id") or default_clip_id(script_path(), node.fullName()))


def settings_of(node, frame_range: Optional[str] = None) -> AnalysisSettings:
    """Analysis settings from the gizmo's knobs; ``frame_range`` overrides the knob (the farm command)."""
    text = frame_range or _text(node, "frame_range") or default_frame_range(node)
    frames = parse_frame_ranges(text).frames()
    clip_id = clip_id_of(node)
    layout = CacheLayout.for_clip(_text(node, "cache_dir"), script_path(), clip_id)
    return AnalysisSettings(clip_id=clip_id, frames=frames, layout=layout,
                            local=is_local_endpoint(endpoint_of(node)))


def endpoint_of(node) -> str:
    return _text(node, "endpoint") or G.DEFAULT_ENDPOINT


def make_client(endpoint: str):
    """An OAVMClient; ``OAVM_SERVICE_COMMAND`` (e.g. ``oavm serve``) starts a local service when none answers."""
    from .bootstrap import missing_modules
    missing = missing_modules()
    if missing:
        raise AnalysisError("Nuke's Python cannot import %s: install the OAVM plug-in from its release zip (it "
                            "vendors pyzmq and msgpack), or add them to NUKE_PATH" % ", ".join(missing))
    from shared.client import OAVMClient
    command = os.environ.get("OAVM_SERVICE_COMMAND", "").strip()
    autostart = shlex.split(command) if command and is_local_endpoint(endpoint) else None
    timeout = float(os.environ.get("OAVM_TIMEOUT_S", "120"))
    return OAVMClient(endpoint, timeout_s=timeout, retries=1, autostart=autostart)


# ---------------------------------------------------------------------------------------------- Nuke pieces

class NukeFrameSource(FrameSource):
    """Renders the gizmo's SourceOut / MaskOut through temporary Write nodes inside the gizmo."""

    def __init__(self, group):
        self.group = group

    def _render(self, from_node: str, pattern: str, channels: str, frames) -> None:
        self.group.begin()
        try:
            write = nuke.nodes.Write()
            try:
                write["file"].setValue(pattern)
                write["channels"].setValue(channels)
                for knob, value in WRITE_KNOBS:
                    write[knob].setValue(value)
                write.setInput(0, self.group.node(from_node))
                for r in compact(sorted(frames)).ranges:
                    nuke.execute(write, r.first, r.last, r.step)
            finally:
                nuke.delete(write)
        except RuntimeError as exc:
            if "cancel" in str(exc).lower():
                raise AnalysisError("rendering was cancelled") from None
            raise AnalysisError("Nuke could not render the %s input: %s"
                                % ("Mask" if from_node == G.MASK_OUT else "Source", exc)) from None
        finally:
            self.group.end()

    def prepare(self, frames, layout: CacheLayout) -> None:
        todo = [f for f in frames if not os.path.isfile(layout.source(f))]
        if todo:
            self._render(G.SOURCE_OUT, layout.source_pattern, "rgb", todo)

    def render_mask(self, frame: int, layout: CacheLayout) -> None:
        self._render(G.MASK_OUT, layout.prompt_pattern, "alpha", [frame])


class NukeProgress(Progress):
    """``nuke.ProgressTask``: a progress bar with a Cancel button (a line of text in terminal mode)."""

    def __init__(self, title: str):
        self.task = nuke.ProgressTask(title)

    def update(self, done: int, total: int, message: str) -> None:
        self.task.setMessage(message)
        self.task.setProgress(int(100 * done / max(total, 1)))

    def cancelled(self) -> bool:
        return bool(self.task.isCancelled())

    def close(self) -> None:
        self.task = None      # deleting the task closes its dialog


def show_cache(node, settings: AnalysisSettings) -> None:
    """Point the gizmo's MatteRead at the cached mattes and switch the output to them."""
    read = node.node(G.MATTE_READ)
    first, last = min(settings.frames), max(settings.frames)
    read["file"].setValue(settings.layout.matte_pattern)
    for knob, value in (("first", first), ("last", last), ("origfirst", first), ("origlast", last)):
        read[knob].setValue(value)
    node["cache_ready"].setValue(True)


def set_status(node, text: str) -> None:
    node["status"].setValue(text)


# ---------------------------------------------------------------------------------------------- buttons

def run_analysis(node, frame_range: Optional[str] = None, progress: Optional[Progress] = None,
                 correction_at: Optional[int] = None) -> AnalysisReport:
    """Analyse (after adding a correction at ``correction_at``, if given) and show the cache. Raises on errors."""
    settings = settings_of(node, frame_range)
    if _text(node, "clip_id") != settings.clip_id:
        node["clip_id"].setValue(settings.clip_id)     # from now on the id no longer follows the script's name
    client = make_client(endpoint_of(node))
    try:
        status = client.status()          # fails fast, with the service's address, when none answers
        settings.local = settings.local and bool(status.get("matte_file", True))
        analyzer = Analyzer(client, settings, NukeFrameSource(node), progress)
        if correction_at is not None:
            analyzer.add_correction(correction_at)
        report = analyzer.run()
    finally:
        client.close()
    state = cache_status(settings.layout, settings.clip_id, settings.frames)
    if state.cached:
        show_cache(node, settings)
    corrections = analyzer.corrections
    set_status(node, "%s; %s%s" % (report.describe(), state.describe(),
                                    "; re-prompts at %s" % compact(corrections) if corrections else ""))
    return report


def service_errors() -> tuple:
    """The client's error types (none while the client cannot be imported: make_client reports that)."""
    try:
        from shared.protocol import OAVMServiceError
    except ImportError:
        return ()
    return (OAVMServiceError,)


def _button(node, title: str, **kw) -> Optional[AnalysisReport]:
    """Run from a gizmo button: progress dialog, errors shown to the artist instead of a traceback."""
    progress = NukeProgress(title)
    try:
        return run_analysis(node, progress=progress, **kw)
    except USER_ERRORS + service_errors() as exc:
        set_status(node, "error: %s" % exc)
        nuke.message("OAVM: %s" % exc)
        return None
    finally:
        progress.close()


def analyze(node=None) -> Optional[AnalysisReport]:
    """The Analyze button."""
    node = node or nuke.thisNode()
    return _button(node, "OAVM: analysing %s" % node.name())


def reprompt_here(node=None) -> Optional[AnalysisReport]:
    """The "Re-prompt here" button: the Mask input at the current frame becomes a correction."""
    node = node or nuke.thisNode()
    return _button(node, "OAVM: re-prompt at frame %d" % nuke.frame(), correction_at=int(nuke.frame()))


def clear_reprompts(node=None) -> None:
    """The "Clear re-prompts" button."""
    node = node or nuke.thisNode()
    try:
        settings = settings_of(node)
    except USER_ERRORS as exc:
        set_status(node, "error: %s" % exc)
        nuke.message("OAVM: %s" % exc)
        return
    Analyzer(None, settings, NukeFrameSource(node)).clear_corrections()
    set_status(node, "re-prompts cleared; press Analyze to update the frames after %d" % settings.frames[0])
