# SPDX-License-Identifier: GPL-3.0-or-later
"""The clip id: the name under which the service keeps a gizmo's clip session and the cache keeps its mattes.

It must be stable (the same script and node give the same id in every Nuke session and on every farm machine, so
the cache is found again) and distinct (two scripts named ``comp_v001.nk`` in two shot folders must not share a
service session). Hence: script name + node path for the human, plus a short hash of the script's full path.
The gizmo stores the id in its ``clip_id`` knob at the first analysis, so renaming or versioning up the script
later keeps pointing at the same cache.
"""
from __future__ import annotations

import hashlib
import os
import re

MAX_LEN = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,%d}$" % (MAX_LEN - 1))


class ClipIdError(ValueError):
    """A clip id the cache or the service cannot use."""


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._-") or "x"


def default_clip_id(script_path: str, node_path: str) -> str:
    """``<script stem>.<node path>-<8 hex of the script's absolute path>``, e.g. ``sh010_comp.OAVM1-3fa2c1d0``.

    ``script_path`` is ``nuke.root().name()`` (``"Root"`` or empty while the script is unsaved: then the id is
    still deterministic, but the artist is asked to save before the cache is placed beside the script).
    ``node_path`` is ``node.fullName()`` (``Group1.OAVM1`` inside groups).
    """
    saved = bool(script_path) and script_path != "Root"
    stem = os.path.splitext(os.path.basename(script_path))[0] if saved else "untitled"
    where = os.path.abspath(script_path) if saved else "untitled"
    digest = hashlib.sha1(where.replace("\\", "/").encode("utf-8")).hexdigest()[:8]
    head = "%s.%s" % (_safe(stem), _safe(node_path))
    return "%s-%s" % (head[:MAX_LEN - 9], digest)


def validate_clip_id(clip_id: str) -> str:
    """The id, stripped, if it is safe as a folder name on every OS and as a service key; else a clear error."""
    clip_id = (clip_id or "").strip()
    if not _VALID.match(clip_id) or clip_id in (".", ".."):
        raise ClipIdError("clip id %r is not usable: use up to %d letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit (or clear the knob to get the default)" % (clip_id, MAX_LEN))
    return clip_id
