# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM Matte: object-aware video matting for Blender's compositor, through the local OAVM service.

Registration only. The bpy modules are imported inside register() so that the plain logic in ``core/`` can be
imported (and tested) without Blender.
"""


def register() -> None:
    from . import operators, properties, ui

    properties.register()
    operators.register()
    ui.register()


def unregister() -> None:
    from . import operators, properties, ui

    ui.unregister()
    operators.unregister()
    properties.unregister()
