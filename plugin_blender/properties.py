# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's settings: service preferences (per user) and the per-scene job settings (saved in the blend file).

Saved per scene so that a farm or a script can run the same job headlessly:
``blender -b shot.blend --python-expr "import bpy; bpy.ops.oavm.matte_clip()"``.
"""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .core.service import DEFAULT_AUTOSTART, ServiceSettings

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5590"


class OAVMPreferences(bpy.types.AddonPreferences):
    """How to reach the OAVM service, and how to start it when none answers."""
    bl_idname = __package__

    endpoint: StringProperty(name="Endpoint", default=DEFAULT_ENDPOINT,
                             description="ZeroMQ address of the OAVM service (tcp://host:port)")
    service_command: StringProperty(
        name="Service Command", default=DEFAULT_AUTOSTART,
        description="Command that starts the service when none answers (its --endpoint is added). Empty: never "
                    "start one, only connect")
    timeout_s: FloatProperty(name="Timeout (s)", default=120.0, min=1.0, max=3600.0,
                             description="How long to wait for one frame's reply before retrying")
    retries: IntProperty(name="Retries", default=1, min=0, max=10,
                         description="How often to resend a request that got no reply")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "endpoint")
        layout.prop(self, "service_command")
        row = layout.row()
        row.prop(self, "timeout_s")
        row.prop(self, "retries")

    def settings(self) -> ServiceSettings:
        return ServiceSettings(self.endpoint, self.service_command, self.timeout_s, self.retries)


def preferences(context: bpy.types.Context) -> ServiceSettings:
    prefs = context.preferences.addons.get(__package__)
    return prefs.preferences.settings() if prefs is not None else ServiceSettings()


def _is_sequence(_self: object, image: bpy.types.Image) -> bool:
    return image.source == "SEQUENCE"


class OAVMSceneSettings(bpy.types.PropertyGroup):
    """What to matte and where the mattes go (``scene.oavm``)."""

    source_type: EnumProperty(name="Source", items=[
        ("CLIP", "Movie Clip", "A Movie Clip datablock (movie file or image sequence)"),
        ("IMAGE", "Image Sequence", "An Image datablock whose source is Image Sequence"),
    ], default="CLIP")
    clip: PointerProperty(name="Clip", type=bpy.types.MovieClip)
    image: PointerProperty(name="Image Sequence", type=bpy.types.Image, poll=_is_sequence)

    mask_source: EnumProperty(name="First-Frame Mask", items=[
        ("MASK", "Mask", "A Mask datablock: each mask layer is one object"),
        ("IMAGE", "Image", "A mask image: white = object (one object, named after the image)"),
        ("IMAGE_ALPHA", "Image Alpha", "The alpha of an image: opaque = object (one object)"),
    ], default="MASK")
    mask: PointerProperty(name="Mask", type=bpy.types.Mask)
    mask_image: PointerProperty(name="Mask Image", type=bpy.types.Image)
    reprompt_all_layers: BoolProperty(
        name="All Layers", default=False,
        description="Re-prompt every mask layer at the current frame; off: only the active layer, the other "
                    "objects continue from their own matte at that frame")

    range_mode: EnumProperty(name="Frames", items=[
        ("CLIP", "Whole Clip", "Every frame of the clip"),
        ("SCENE", "Scene Range", "The scene's start to end frame"),
        ("CUSTOM", "Custom", "The range below"),
    ], default="CLIP")
    frame_start: IntProperty(name="Start", default=1)
    frame_end: IntProperty(name="End", default=250)

    clip_id: StringProperty(name="Clip ID", default="",
                            description="Name of the clip on the service and of its matte folder; empty: derived "
                                        "from the blend file path and the clip name")
    output_dir: StringProperty(name="Output Folder", default="", subtype="DIR_PATH",
                               description="Where matte.####.exr go; empty: //oavm/<clip id>/ next to the blend file")
    colorspace: EnumProperty(name="Plate Colour", items=[
        ("FROM_DATABLOCK", "From Clip", "Use the clip's colour space setting (linear spaces are sRGB-encoded)"),
        ("auto", "By File Type", "Float files (EXR) are linear, integer files (PNG, JPEG) display-referred"),
        ("display", "Display-Referred", "Send the pixels as they are (sRGB/Rec.709 encoded plates)"),
        ("linear", "Scene-Linear", "Encode with the sRGB curve before sending"),
    ], default="FROM_DATABLOCK")
    half_float: BoolProperty(name="Half Float", default=True, description="Write the mattes as 16-bit half EXRs")
    downsample_ratio: FloatProperty(
        name="Downsample", default=0.0, min=0.0, max=1.0,
        description="Resolution the network works at, as a fraction of the frame; 0: chosen by the service")


CLASSES = (OAVMPreferences, OAVMSceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.oavm = PointerProperty(type=OAVMSceneSettings)


def unregister() -> None:
    del bpy.types.Scene.oavm
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
