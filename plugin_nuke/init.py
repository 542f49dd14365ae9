# SPDX-License-Identifier: GPL-3.0-or-later
# OAVM for Nuke: run by Nuke at start-up (GUI, terminal and render modes) because this folder is on the plug-in
# path (NUKE_PATH, or nuke.pluginAddPath("/path/to/plugin_nuke") in your ~/.nuke/init.py).
# Makes the OAVM client and its vendored pyzmq/msgpack importable; OAVM.gizmo in this folder is found by Nuke.
import os
import sys

import nuke


def _plugin_root():
    """This folder: __file__ where Nuke sets it, else the plug-in path entry that holds OAVM.gizmo."""
    try:
        return os.path.dirname(os.path.abspath(__file__))
    except NameError:
        for folder in nuke.pluginPath():
            if os.path.isfile(os.path.join(folder, "OAVM.gizmo")):
                return folder
    return None


_root = _plugin_root()
if _root:
    if _root not in sys.path:
        sys.path.insert(0, _root)
    from oavm_nuke.bootstrap import setup_paths

    setup_paths(_root)
