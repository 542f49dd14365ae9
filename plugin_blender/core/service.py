# SPDX-License-Identifier: GPL-3.0-or-later
"""Reaching the OAVM service from Blender: the client, the autostart command and error messages for artists.

The client is the repo's ``shared`` package. ``build.py dist`` vendors it into the extension as ``<add-on>/shared``
(it imports itself relatively); when the add-on runs from the repository (development, plain-logic tests) the
repo's top-level ``shared`` package is used instead.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import OAVMBlenderError

DEFAULT_AUTOSTART = "oavm serve"


def shared_module() -> ModuleType:
    """The ``shared`` package: the copy vendored into the built extension, else the repository's."""
    try:
        from .. import shared  # type: ignore[attr-defined]  # vendored by tools/dist_blender.py
    except ImportError:
        import shared  # running from the repository
    return shared


@dataclass
class ServiceSettings:
    """The add-on preferences that say how to reach (and, if needed, start) the service."""
    endpoint: str = "tcp://127.0.0.1:5590"
    autostart_command: str = DEFAULT_AUTOSTART   # empty: never start a service, only connect
    timeout_s: float = 120.0                     # per request; the first frame on a cold GPU can take a while
    retries: int = 1

    def autostart_argv(self) -> list[str] | None:
        """The command as argv, told to listen where the add-on connects (``--endpoint``) unless it says so."""
        argv = shlex.split(self.autostart_command, posix=os.name != "nt")
        if not argv:
            return None
        if "--endpoint" not in argv and not any(a.startswith("--endpoint=") for a in argv):
            argv += ["--endpoint", self.endpoint]
        return argv


def connect(settings: ServiceSettings) -> Any:
    """An OAVMClient for ``settings`` (no request is sent yet; the first one may start the service)."""
    client_class = shared_module().OAVMClient
    return client_class(settings.endpoint, timeout_s=settings.timeout_s, retries=settings.retries,
                        autostart=settings.autostart_argv())


def describe_error(exc: BaseException, settings: ServiceSettings) -> str:
    """One sentence for ``self.report({'ERROR'}, ...)``: what went wrong and what to do next."""
    shared = shared_module()
    if isinstance(exc, shared.OAVMServiceUnavailable):
        start = (f"the add-on tried to start it with `{settings.autostart_command}`"
                 if settings.autostart_argv() else "no autostart command is set")
        return (f"OAVM service not reachable: {exc.message}. ({start}; set the endpoint and the service command in "
                f"Preferences > Add-ons > OAVM Matte)")
    if isinstance(exc, shared.OAVMServiceError):
        return f"the OAVM service refused the job: {exc.message}"
    if isinstance(exc, OAVMBlenderError):
        return str(exc)
    if isinstance(exc, OSError) and settings.autostart_argv() and exc.filename is not None:
        return (f"could not start the OAVM service with `{settings.autostart_command}` ({exc.strerror}): install "
                f"the OAVM service, or set the full command (e.g. /path/to/venv/bin/oavm serve) in Preferences > "
                f"Add-ons > OAVM Matte")
    return f"OAVM job failed: {type(exc).__name__}: {exc}"
