# SPDX-License-Identifier: GPL-3.0-or-later
"""The "OAVM Matte" panel in the compositor's sidebar (N panel, tab "OAVM")."""
from __future__ import annotations

import bpy

from . import jobs


class OAVM_PT_matte(bpy.types.Panel):
    bl_label = "OAVM Matte"
    bl_space_type = "NODE_EDITOR"
    bl_region_type = "UI"
    bl_category = "OAVM"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        space = context.space_data
        return space is not None and getattr(space, "tree_type", "") == "CompositorNodeTree"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.oavm

        col = layout.column()
        col.prop(settings, "source_type")
        col.prop(settings, "clip" if settings.source_type == "CLIP" else "image")
        col.prop(settings, "colorspace")

        col = layout.column()
        col.prop(settings, "mask_source")
        col.prop(settings, "mask" if settings.mask_source == "MASK" else "mask_image")

        col = layout.column()
        col.prop(settings, "range_mode")
        if settings.range_mode == "CUSTOM":
            row = col.row(align=True)
            row.prop(settings, "frame_start")
            row.prop(settings, "frame_end")

        col = layout.column()
        col.prop(settings, "clip_id", placeholder="automatic")
        col.prop(settings, "output_dir", placeholder="//oavm/<clip id>/")
        col.prop(settings, "half_float")
        col.prop(settings, "downsample_ratio")

        running = jobs.running()
        busy = running is not None and running.outcome is None
        col = layout.column()
        col.enabled = not busy
        col.operator("oavm.matte_clip", icon="RENDER_ANIMATION")
        row = col.row(align=True)
        row.operator("oavm.reprompt", icon="MASK")
        if settings.mask_source == "MASK":
            row.prop(settings, "reprompt_all_layers", text="", icon="RENDERLAYERS")
        if busy and running.thread.last_progress is not None:
            p = running.thread.last_progress
            layout.label(text=f"Frame {p.frame}: {p.done}/{p.total} (Esc to cancel)", icon="TIME")


CLASSES = (OAVM_PT_matte,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
