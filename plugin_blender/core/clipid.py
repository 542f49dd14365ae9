# SPDX-License-Identifier: GPL-3.0-or-later
"""Clip ids: the name under which the OAVM service keeps a clip's memory, and the folder its mattes go to.

The default id must be the same every time the artist re-opens the blend file (so "Re-prompt" finds the mattes
of the earlier run) yet differ between two shots that happen to use a clip of the same name: a readable slug of
the clip's name plus a short hash of the blend file's absolute path and the clip's name.
"""
from __future__ import annotations

import hashlib
import os
import re

from .errors import OAVMBlenderError

MAX_CLIP_ID_CHARS = 64
_ALLOWED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str, max_chars: int = 40) -> str:
    """Lower-case letters and digits joined by single dashes ("Shot 010 Plate.mov" -> "shot-010-plate-mov")."""
    return _NOT_SLUG.sub("-", text.lower()).strip("-")[:max_chars].strip("-") or "clip"


def default_clip_id(blend_path: str, clip_name: str) -> str:
    """``<slug of clip name>-<10 hex digits>``; the hash covers the blend file's absolute path and the clip name.

    An unsaved blend file (empty path) still gets an id, but it changes once the file is saved; the operator
    asks for a saved file anyway when the mattes go next to it.
    """
    where = os.path.normcase(os.path.abspath(blend_path)) if blend_path else "<unsaved>"
    digest = hashlib.sha256(f"{where}\0{clip_name}".encode("utf-8")).hexdigest()[:10]
    return f"{slug(clip_name)}-{digest}"


def check_clip_id(clip_id: str) -> str:
    """Return ``clip_id`` if it is usable as a service clip id *and* a folder name, else say how to fix it."""
    if not clip_id or len(clip_id) > MAX_CLIP_ID_CHARS or not _ALLOWED.match(clip_id) or ".." in clip_id:
        raise OAVMBlenderError(
            f"clip id {clip_id!r} cannot be used: use 1-{MAX_CLIP_ID_CHARS} letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), or clear the field to use the automatic id")
    return clip_id
