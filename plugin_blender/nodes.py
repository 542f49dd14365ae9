# SPDX-License-Identifier: GPL-3.0-or-later
"""The "OAVM Matte" compositor node group: reads a clip's matte EXR sequence in step with the scene frame.

Group interface: input ``Image``; outputs ``Image`` (the input with the matte as alpha, through Set Alpha in
"Apply Mask" mode, i.e. premultiplied as Blender's compositor expects), ``Alpha`` (all objects together: their
maximum) and one ``<object> Alpha`` per object. Re-running a job updates the same group (found by its clip id),
keeping the links of its instances.

Blender versions differ here, and both are handled:
* 5.0+: the scene's compositor is a node group at ``scene.compositing_node_group`` (no Composite node; output
  through a Group Output), Math is ``ShaderNodeMath`` and Set Alpha's mode is its "Type" menu input socket;
* 4.2-4.5: ``scene.node_tree`` with ``scene.use_nodes``, ``CompositorNodeMath`` and ``SetAlpha.mode``.
"""
from __future__ import annotations

import bpy

from .core.frames import matte_files

GROUP_NAME = "OAVM Matte"
CLIP_ID_KEY = "oavm_clip_id"
OUTPUT_DIR_KEY = "oavm_output_dir"


def compositor_tree(scene: bpy.types.Scene) -> bpy.types.NodeTree | None:
    """The scene's compositor node tree, or None when the scene has none (nothing is created)."""
    if hasattr(scene, "compositing_node_group"):     # Blender 5.0+
        return scene.compositing_node_group
    return scene.node_tree if scene.use_nodes else None


def _math_node_type() -> str:
    return "CompositorNodeMath" if hasattr(bpy.types, "CompositorNodeMath") else "ShaderNodeMath"


def _set_apply_mask(node: bpy.types.Node) -> None:
    if hasattr(node, "mode"):                         # Blender < 5.0: an enum property
        node.mode = "APPLY"
    elif (socket := node.inputs.get("Type")) is not None:   # Blender 5.0+: a menu input socket
        socket.default_value = "Apply Mask"


def _interface_sockets(group: bpy.types.NodeTree, in_out: str) -> dict[str, bpy.types.NodeTreeInterfaceSocket]:
    return {item.name: item for item in group.interface.items_tree
            if item.item_type == "SOCKET" and item.in_out == in_out}


def _sync_interface(group: bpy.types.NodeTree, object_ids: list[str]) -> None:
    """Inputs [Image]; outputs [Image, Alpha, <obj> Alpha...]: add what is missing, drop stale object outputs.

    Sockets that stay are not recreated, so links from the group's instances survive a re-run.
    """
    wanted_out = [("Image", "NodeSocketColor"), ("Alpha", "NodeSocketFloat")]
    wanted_out += [(f"{obj} Alpha", "NodeSocketFloat") for obj in object_ids]
    if "Image" not in _interface_sockets(group, "INPUT"):
        group.interface.new_socket("Image", in_out="INPUT", socket_type="NodeSocketColor")
    outputs = _interface_sockets(group, "OUTPUT")
    for name, item in outputs.items():
        if name not in dict(wanted_out):
            group.interface.remove(item)
    for name, socket_type in wanted_out:
        if name not in outputs:
            group.interface.new_socket(name, in_out="OUTPUT", socket_type=socket_type)


def find_group(clip_id: str) -> bpy.types.NodeTree | None:
    return next((g for g in bpy.data.node_groups if g.get(CLIP_ID_KEY) == clip_id), None)


def _matte_image(clip_id: str, first_path: str) -> bpy.types.Image:
    """The Image datablock of the clip's matte sequence (reloaded, so rewritten files are seen)."""
    name = f"OAVM {clip_id}"
    image = next((i for i in bpy.data.images if i.get(CLIP_ID_KEY) == clip_id), None)
    if image is None:
        image = bpy.data.images.load(first_path, check_existing=False)
        image.name = name
        image[CLIP_ID_KEY] = clip_id
    image.filepath = _relative_if_possible(first_path)
    image.source = "SEQUENCE"
    try:
        image.colorspace_settings.name = "Non-Color"   # mattes are data, never colour-managed
    except TypeError:
        pass
    image.reload()
    return image


def _relative_if_possible(path: str) -> str:
    if bpy.data.filepath:
        try:
            return bpy.path.relpath(path)
        except ValueError:   # another drive on Windows
            pass
    return path


def _output_socket(node: bpy.types.Node, name: str) -> bpy.types.NodeSocket:
    """An Image node's pass socket; loads the image when Blender has not looked at the file yet."""
    socket = node.outputs.get(name)
    if socket is None and node.image is not None:
        node.image.update()       # a multilayer EXR lists its passes only once its pixels were loaded
        socket = node.outputs.get(name)
    if socket is None:
        raise RuntimeError(f"the matte EXR has no layer {name!r} (it has {[s.name for s in node.outputs]}); "
                           f"run 'Matte Clip' again")
    return socket


def update_matte_group(clip_id: str, output_dir: str, object_ids: list[str]) -> bpy.types.NodeTree:
    """Create or update the clip's "OAVM Matte" group to read ``output_dir``'s mattes; returns the group."""
    files = matte_files(output_dir)
    numbers = files.existing_numbers()
    if not numbers:
        raise RuntimeError(f"no matte was written to {output_dir}")
    first, last = numbers[0], numbers[-1]
    group = find_group(clip_id)
    if group is None:
        group = bpy.data.node_groups.new(GROUP_NAME, "CompositorNodeTree")
        group[CLIP_ID_KEY] = clip_id
    group[OUTPUT_DIR_KEY] = output_dir
    _sync_interface(group, object_ids)
    group.nodes.clear()
    nodes, links = group.nodes, group.links

    group_in = nodes.new("NodeGroupInput")
    group_in.location = (-500, 0)
    group_out = nodes.new("NodeGroupOutput")
    group_out.location = (500, 0)
    matte = nodes.new("CompositorNodeImage")
    matte.name = matte.label = "OAVM matte sequence"
    matte.location = (-500, -250)
    matte.image = _matte_image(clip_id, files.path(first))
    # image user: scene frame f reads file (f - frame_start + 1) + frame_offset = f  (files are numbered by frame)
    matte.frame_start = first
    matte.frame_duration = last - first + 1
    matte.frame_offset = first - 1
    matte.use_auto_refresh = True

    alpha = _output_socket(matte, object_ids[0])
    for i, obj in enumerate(object_ids[1:], start=1):
        maximum = nodes.new(_math_node_type())
        maximum.operation = "MAXIMUM"
        maximum.location = (-200 + 150 * i, -250)
        links.new(alpha, maximum.inputs[0])
        links.new(_output_socket(matte, obj), maximum.inputs[1])
        alpha = maximum.outputs[0]

    set_alpha = nodes.new("CompositorNodeSetAlpha")
    set_alpha.location = (200, 0)
    _set_apply_mask(set_alpha)
    links.new(group_in.outputs["Image"], set_alpha.inputs["Image"])
    links.new(alpha, set_alpha.inputs["Alpha"])
    links.new(set_alpha.outputs[0], group_out.inputs["Image"])
    links.new(alpha, group_out.inputs["Alpha"])
    for obj in object_ids:
        links.new(_output_socket(matte, obj), group_out.inputs[f"{obj} Alpha"])
    return group


def place_group(scene: bpy.types.Scene, group: bpy.types.NodeTree,
                source: bpy.types.ID | None) -> bpy.types.Node | None:
    """Put an instance of ``group`` into the scene's compositor (if it has one and none is there yet).

    When the compositor reads the matted clip (an Image or Movie Clip node of ``source``) that node's image is
    linked to the group's input; nothing downstream is rewired, the artist decides where the matte goes.
    """
    tree = compositor_tree(scene)
    if tree is None:
        return None
    instance = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeGroup" and n.node_tree == group), None)
    if instance is not None:
        return instance
    instance = tree.nodes.new("CompositorNodeGroup")
    instance.node_tree = group
    instance.label = group.name
    reader = next((n for n in tree.nodes if source is not None and (getattr(n, "image", None) == source
                                                                    or getattr(n, "clip", None) == source)), None)
    if reader is not None:
        instance.location = (reader.location.x + 300, reader.location.y)
        links_to_input = [link for link in tree.links if link.to_socket == instance.inputs["Image"]]
        if not links_to_input and reader.outputs.get("Image") is not None:
            tree.links.new(reader.outputs["Image"], instance.inputs["Image"])
    return instance
