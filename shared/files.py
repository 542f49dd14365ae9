# SPDX-License-Identifier: GPL-3.0-or-later
"""How every OAVM writer puts a file in place, and how a rerun tidies what a killed one left.

A matte is written under a hidden temporary name beside it and renamed over the final name only when complete, so
a compositor, a farm's frame check or the next run never reads half a frame. A writer that fails removes its own
temporary file; one that is killed (SIGKILL, Blender or Nuke crashing, a node losing power) cannot, so the next run
of the same job removes the temporaries of the frames it is about to write. The farm batch, the Blender add-on
and the Nuke gizmo's cache share this one naming.

Here in ``shared/`` because the plug-ins vendor only this package (Python 3.7 syntax, for Nuke 13).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Set, Union

_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.oavm-tmp-(?P<pid>\d+)")


def temporary_path(path: Union[str, "os.PathLike[str]"]) -> Path:
    """A hidden name beside ``path`` that no sequence pattern matches (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(".%s.oavm-tmp-%d" % (path.name, os.getpid()))


def remove_quietly(path: Union[str, "os.PathLike[str]"]) -> None:
    """Remove a temporary file if it is there (a failed write's; the error that matters is the write's)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def left_temporaries(paths: Iterable[Union[str, "os.PathLike[str]"]]) -> List[Path]:
    """The temporary files that other processes left beside ``paths``.

    One listing per folder, so ten thousand frames cost one ``scandir``, not ten thousand globs. Only the
    temporaries of these very files are named, so a job writing frames 1-50 never touches what a job writing
    51-100 into the same folder has in hand; this process's own are left to its writers."""
    wanted: Dict[Path, Set[str]] = {}
    for path in map(Path, paths):
        wanted.setdefault(path.parent, set()).add(path.name)
    left = []
    for folder, names in wanted.items():
        try:
            with os.scandir(folder) as entries:
                found = [entry.name for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in found:
            match = _TEMPORARY_NAME.fullmatch(name)
            if match and match.group("name") in names and int(match.group("pid")) != os.getpid():
                left.append(folder / name)
    return sorted(left)


def remove_left_temporaries(paths: Iterable[Union[str, "os.PathLike[str]"]]) -> List[Path]:
    """Remove :func:`left_temporaries` of ``paths``; returns them, for the run's log."""
    left = left_temporaries(paths)
    for path in left:
        remove_quietly(path)
    return left


def describe_removed(left: List[Path]) -> str:
    """One log line for what :func:`remove_left_temporaries` removed."""
    names = ", ".join(path.name for path in left[:3]) + (", ..." if len(left) > 3 else "")
    return "removed %d half-written file(s) an interrupted run left: %s" % (len(left), names)
