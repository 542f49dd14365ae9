# SPDX-License-Identifier: GPL-3.0-or-later
"""Make ``shared`` (the OAVM client), pyzmq and msgpack importable in Nuke's Python. Standard library only.

The plug-in zip (``python3 build.py dist``) holds ``shared/`` beside this package and the wheels of pyzmq and
msgpack unpacked per Python version and platform in ``vendor/py<major>.<minor>-<os>-<arch>/`` (Nuke 13: 3.7,
Nuke 14: 3.9, Nuke 15: 3.10, Nuke 16: 3.11). Used from a repository checkout instead, ``shared/`` is found in the
folder above ``plugin_nuke/`` and pyzmq/msgpack must come from Nuke's own site-packages.
"""
from __future__ import annotations

import os
import platform
import sys

PLATFORM_TAGS = {"linux": "linux", "win32": "windows", "darwin": "macos"}
ARCH_TAGS = {"x86_64": "x86_64", "amd64": "x86_64", "arm64": "arm64", "aarch64": "arm64"}


def vendor_folder_name(version=None, sys_platform=None, machine=None) -> str:
    """``py3.11-linux-x86_64``: the folder of wheels made for this interpreter (see tools/dist_nuke.py)."""
    version = version or sys.version_info
    osname = PLATFORM_TAGS.get(sys_platform or sys.platform, sys_platform or sys.platform)
    arch = ARCH_TAGS.get((machine or platform.machine()).lower(), (machine or platform.machine()).lower())
    return "py%d.%d-%s-%s" % (version[0], version[1], osname, arch)


def setup_paths(plugin_root: str) -> list:
    """Put the vendored packages and ``shared`` on ``sys.path``; returns the folders added (for the log)."""
    added = []
    vendor = os.path.join(plugin_root, "vendor", vendor_folder_name())
    candidates = [vendor]
    if not os.path.isdir(os.path.join(plugin_root, "shared")):
        candidates.append(os.path.dirname(os.path.abspath(plugin_root)))   # a repository checkout
    for folder in candidates:
        if os.path.isdir(folder) and folder not in sys.path:
            sys.path.insert(0, folder)
            added.append(folder)
    return added


def missing_modules() -> list:
    """Which of the client's imports fail, for a message that says what to install."""
    missing = []
    for name in ("numpy", "zmq", "msgpack", "shared.client"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing
