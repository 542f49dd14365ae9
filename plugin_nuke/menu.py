# SPDX-License-Identifier: GPL-3.0-or-later
# OAVM for Nuke: run by Nuke at start-up in GUI mode only. Adds Nodes > OAVM > OAVM, which creates the gizmo.
import nuke

_toolbar = nuke.menu("Nodes")
_menu = _toolbar.addMenu("OAVM")
_menu.addCommand("OAVM", "nuke.createNode('OAVM')",
                 tooltip="Object-aware video matting: a matte from a plate and a first-frame mask")
