# SPDX-License-Identifier: GPL-3.0-or-later
"""Scenarios run inside real Blender (the ``bpy`` module, background mode), one per process.

``python bpy_scenarios.py <scenario> '<json args>'`` with ``BLENDER_USER_RESOURCES`` set to a fresh folder:
installs the built extension zip there the way "Install from Disk" does
(``bpy.ops.extensions.package_install_files``), enables it, builds a scene and runs the add-on's operators.
It prints one line ``OAVM-RESULT <json>`` with what it observed; test_blender_extension.py checks it.
Works with bpy 4.2-5.x (compositor at ``scene.compositing_node_group`` from 5.0, ``scene.node_tree`` before).
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import os
import sys
import tempfile
import time
import traceback

import bpy

ADDON = "bl_ext.user_default.oavm_matte"
RESULT = "OAVM-RESULT "


# ------------------------------------------------------------------------------------------------ setup
PYTHON_DIR = f"python{sys.version_info[0]}.{sys.version_info[1]}"


def install(zip_path: str) -> dict:
    """Install + enable the extension zip into this process's (fresh) user resources.

    Blender's own Python finds the modules Blender bundles (OpenImageIO) and the extension's installed wheels
    (pyzmq, msgpack) first; the ``bpy`` module in a venv does not, so both folders are put in front of the venv's
    site-packages here, and the add-on runs with exactly what a real Blender gives it.
    """
    bundled = os.path.join(bpy.utils.resource_path("LOCAL"), "python", "lib", PYTHON_DIR, "site-packages")
    sys.path.insert(0, bundled)
    started = time.monotonic()
    outcome = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                                      enable_on_install=True)
    site = os.path.join(bpy.utils.resource_path("USER"), "extensions", ".local", "lib", PYTHON_DIR, "site-packages")
    sys.path.insert(0, site)
    import zmq
    import msgpack
    return {"outcome": sorted(outcome), "enabled": ADDON in bpy.context.preferences.addons,
            "seconds": time.monotonic() - started, "site_packages": site,
            "installed": sorted(os.listdir(site)) if os.path.isdir(site) else [],
            "modules": {"zmq": zmq.__file__, "msgpack": msgpack.__file__,
                        "OpenImageIO": addon("core.imageio").oiio.__file__}, "bundled": bundled,
            "bundled_has_oiio": os.path.isdir(os.path.join(bundled, "OpenImageIO")),
            "blender": bpy.app.version_string}


def addon(name: str):
    return importlib.import_module(f"{ADDON}.{name}")


def set_preferences(endpoint: str, command: str = "", timeout_s: float = 60.0, retries: int = 0) -> None:
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.endpoint, prefs.service_command, prefs.timeout_s, prefs.retries = endpoint, command, timeout_s, retries


def compositor(scene: bpy.types.Scene) -> bpy.types.NodeTree:
    """The scene's compositor tree, created the way each Blender version does it."""
    if hasattr(scene, "compositing_node_group"):            # 5.0+: a node group with a Group Output
        if scene.compositing_node_group is None:
            tree = bpy.data.node_groups.new("Compositor", "CompositorNodeTree")
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
            tree.nodes.new("NodeGroupOutput")
            scene.compositing_node_group = tree
        return scene.compositing_node_group
    scene.use_nodes = True                                   # 4.x: the scene's own tree with a Composite node
    tree = scene.node_tree
    for node in list(tree.nodes):
        tree.nodes.remove(node)
    tree.nodes.new("CompositorNodeComposite")
    return tree


def compositor_output(tree: bpy.types.NodeTree) -> bpy.types.NodeSocket:
    node = next(n for n in tree.nodes if n.bl_idname in ("NodeGroupOutput", "CompositorNodeComposite"))
    return node.inputs["Image"]


def plate_scene(args: dict) -> bpy.types.Scene:
    """The synthetic plates as an image sequence, a rectangle mask around the disc, saved as shot.blend."""
    scene = bpy.context.scene
    width, height, frames = args["width"], args["height"], args["frames"]
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    scene.frame_start, scene.frame_end = 1, frames
    image = bpy.data.images.load(os.path.join(args["plates"], "plate_0001.png"))
    image.source = "SEQUENCE"
    mask = bpy.data.masks.new("Matte Mask")
    layer = mask.layers.new(name="disc")
    set_rectangle(layer, args["rect"])
    tree = compositor(scene)
    reader = tree.nodes.new("CompositorNodeImage")
    reader.image = image
    reader.frame_duration = frames
    settings = scene.oavm
    settings.source_type, settings.image = "IMAGE", image
    settings.mask_source, settings.mask = "MASK", mask
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(args["work"], "shot.blend"))
    return scene


def set_rectangle(layer: bpy.types.MaskLayer, rect: list[float]) -> None:
    """(x0, y0, x1, y1) in mask space as one closed spline with straight (vector) handles."""
    x0, y0, x1, y1 = rect
    for spline in list(layer.splines):
        layer.splines.remove(spline)
    spline = layer.splines.new()
    spline.points.add(3)                                     # a new spline already has one point
    for point, co in zip(spline.points, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]):
        point.co = co
        point.handle_type = "VECTOR"
    spline.use_cyclic = True


def run_operator(op) -> dict:
    """Call an operator the way a script does (EXEC: synchronous); an error report raises RuntimeError."""
    started = time.monotonic()
    try:
        outcome = op()
        return {"outcome": sorted(outcome), "error": None, "seconds": time.monotonic() - started}
    except RuntimeError as exc:
        return {"outcome": None, "error": str(exc), "seconds": time.monotonic() - started}


def group_info(clip_id: str) -> dict | None:
    nodes = addon("nodes")
    group = nodes.find_group(clip_id)
    if group is None:
        return None
    sockets = [(item.in_out, item.name, item.socket_type) for item in group.interface.items_tree
               if item.item_type == "SOCKET"]
    reader = next(n for n in group.nodes if n.bl_idname == "CompositorNodeImage")
    return {"name": group.name, "sockets": sockets, "image": bpy.path.abspath(reader.image.filepath),
            "frame_start": reader.frame_start, "frame_duration": reader.frame_duration,
            "frame_offset": reader.frame_offset,
            "groups_named_oavm": sorted(g.name for g in bpy.data.node_groups if g.get(nodes.CLIP_ID_KEY))}


def render_frame(scene: bpy.types.Scene, group: bpy.types.NodeTree, frame: int, path: str) -> dict:
    """Compositor render of one frame through the group's instance to a float EXR."""
    tree = addon("nodes").compositor_tree(scene)
    instance = next(n for n in tree.nodes if getattr(n, "node_tree", None) == group)
    linked_from = [link.from_node.bl_idname for link in tree.links if link.to_node == instance]
    tree.links.new(instance.outputs["Image"], compositor_output(tree))
    scene.render.use_compositing = True
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "32"
    scene.render.filepath = path
    scene.frame_set(frame)
    bpy.ops.render.render(write_still=True)
    return {"path": path, "instance_inputs_from": linked_from}


# ------------------------------------------------------------------------------------------------ scenarios
def scenario_cli_install(args: dict) -> dict:
    """``blender --command extension install-file -r user_default -e <zip>``: the handler Blender runs for it."""
    import bl_pkg

    code = bl_pkg.cli_extension(["install-file", "-r", "user_default", "-e", args["zip"]])
    return {"exit_code": code, "enabled": ADDON in bpy.context.preferences.addons,
            "operators": [hasattr(bpy.ops.oavm, name) for name in ("matte_clip", "reprompt")],
            "scene_settings": hasattr(bpy.context.scene, "oavm")}


def scenario_main(args: dict) -> dict:
    """Install, matte the clip headlessly, re-run, render through the group, re-prompt at frame 4."""
    out = {"install": install(args["zip"])}
    set_preferences(args["endpoint"])
    scene = plate_scene(args)
    out["first"] = run_operator(bpy.ops.oavm.matte_clip)
    clip_id = addon("jobs").clip_id_for(scene.oavm, addon("jobs").find_plates(scene, scene.oavm))
    folder = os.path.join(args["work"], "oavm", clip_id)
    out["clip_id"], out["folder"] = clip_id, folder
    out["files_first"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out["group"] = group_info(clip_id)
    mtimes = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in out["files_first"]}
    time.sleep(0.05)
    scene.oavm.range_mode, scene.oavm.frame_start, scene.oavm.frame_end = "CUSTOM", 1, 2   # a shorter re-run
    out["second"] = run_operator(bpy.ops.oavm.matte_clip)
    out["rewritten_by_second"] = sorted(name for name, t in mtimes.items()
                                        if os.stat(os.path.join(folder, name)).st_mtime_ns != t)
    out["group_after_second"] = group_info(clip_id)
    scene.oavm.range_mode = "CLIP"
    out["render"] = render_frame(scene, addon("nodes").find_group(clip_id), 3, os.path.join(args["work"], "r.exr"))
    mtimes = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}
    time.sleep(0.05)
    scene.frame_set(4)
    set_rectangle(scene.oavm.mask.layers["disc"], args["rect_frame4"])
    out["reprompt"] = run_operator(bpy.ops.oavm.reprompt)
    out["rewritten"] = sorted(name for name, t in mtimes.items()
                              if os.stat(os.path.join(folder, name)).st_mtime_ns != t)
    # the Mask layer rasterised by the add-on vs Blender's own Mask node, for a curved shape
    out["raster_vs_blender"] = compare_with_mask_node(scene, args)
    return out


def compare_with_mask_node(scene: bpy.types.Scene, args: dict) -> dict:
    jobs = addon("jobs")
    raster = addon("core.raster")
    mask = bpy.data.masks.new("Curvy")
    layer = mask.layers.new(name="blob")
    spline = layer.splines.new()
    coords = [(0.2, 0.3), (0.7, 0.25), (0.8, 0.6), (0.4, 0.75), (0.15, 0.55)]
    spline.points.add(len(coords) - 1)
    for point, co in zip(spline.points, coords):
        point.co, point.handle_type = co, "AUTO"
    spline.use_cyclic = True
    ours = raster.rasterise_mask(jobs.mask_layer_shapes(mask, bpy.context.evaluated_depsgraph_get()),
                                 args["width"], args["height"])["blob"]
    tree = compositor(scene)
    node = tree.nodes.new("CompositorNodeMask")
    node.mask = mask
    tree.links.new(node.outputs[0], compositor_output(tree))
    path = os.path.join(args["work"], "mask_node.exr")
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    import OpenImageIO as oiio
    theirs = oiio.ImageBuf(path).get_pixels(oiio.FLOAT)[..., 0] > 0.5
    return {"ours": int(ours.sum()), "blender": int(theirs.sum()), "disagree": int(((ours > 0.5) != theirs).sum())}


def scenario_errors(args: dict) -> dict:
    """Every failure is a report + CANCELLED, and leaves no file behind."""
    out = {"install": install(args["zip"])}
    scene = plate_scene(args)
    settings = scene.oavm
    set_preferences(args["dead_endpoint"], "", timeout_s=2)
    out["service_down"] = run_operator(bpy.ops.oavm.matte_clip)
    set_preferences(args["dead_endpoint"], "/nonexistent/oavm serve", timeout_s=2)
    out["autostart_fails"] = run_operator(bpy.ops.oavm.matte_clip)
    set_preferences(args["endpoint"])
    settings.range_mode, settings.frame_start, settings.frame_end = "CUSTOM", 3, 20
    out["range_outside"] = run_operator(bpy.ops.oavm.matte_clip)
    settings.frame_start, settings.frame_end = 5, 2
    out["range_reversed"] = run_operator(bpy.ops.oavm.matte_clip)
    settings.range_mode = "CLIP"
    small = bpy.data.images.new("small mask", 32, 24, alpha=True)
    small.generated_color = (1, 1, 1, 1)
    settings.mask_source, settings.mask_image = "IMAGE", small
    out["mask_size"] = run_operator(bpy.ops.oavm.matte_clip)
    out["prompt_boxes"] = prompt_boxes(scene, args)
    settings.mask_source, settings.mask = "MASK", None
    out["no_mask"] = run_operator(bpy.ops.oavm.matte_clip)
    settings.mask = bpy.data.masks["Matte Mask"]
    out["reprompt_without_mattes"] = run_operator(bpy.ops.oavm.reprompt)
    missing = bpy.data.images.load(os.path.join(args["plates"], "plate_0001.png"))
    missing.filepath = os.path.join(args["work"], "gone", "plate_0001.png")
    missing.source = "SEQUENCE"
    settings.image = missing
    out["clip_missing"] = run_operator(bpy.ops.oavm.matte_clip)
    oavm_dir = os.path.join(args["work"], "oavm")
    out["files"] = sorted(os.path.relpath(os.path.join(d, f), args["work"])
                          for d, _, fs in os.walk(oavm_dir) for f in fs) if os.path.isdir(oavm_dir) else []
    return out


def prompt_boxes(scene: bpy.types.Scene, args: dict) -> dict:
    """Where the prompts of a Mask layer and of an image's alpha land: (first row, last row, first col, last col)."""
    import numpy as np

    jobs = addon("jobs")
    settings = scene.oavm
    width, height = args["width"], args["height"]
    painted = np.zeros((height, width, 4), np.float32)
    painted[12:36, 10:34, 3] = 1.0                          # rows counted from the top, like the prompt
    image = bpy.data.images.new("alpha mask", width, height, alpha=True)
    image.pixels.foreach_set(painted[::-1].ravel())         # Blender stores rows bottom-up

    def box(mask) -> list[int]:
        rows, cols = np.nonzero(mask > 0.5)
        return [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())]

    settings.mask_source, settings.mask_image = "IMAGE_ALPHA", image
    boxes = {name: box(m) for name, m in jobs.prompts_at(scene, settings, 1, (width, height)).items()}
    settings.mask_source = "MASK"
    boxes.update({name: box(m) for name, m in jobs.prompts_at(scene, settings, 1, (width, height)).items()})
    return boxes


def scenario_threaded(args: dict) -> dict:
    """The interactive path without a window: worker thread + the timer callback, pumped by hand; then cancel."""
    out = {"install": install(args["zip"])}
    set_preferences(args["endpoint"])
    scene = plate_scene(args)
    jobs = addon("jobs")
    service = addon("core.service")
    worker = addon("core.worker")
    settings = bpy.context.preferences.addons[ADDON].preferences.settings()

    scene.oavm.range_mode, scene.oavm.frame_start, scene.oavm.frame_end = "CUSTOM", 1, 3

    class HeldSecondFrame:
        """The service client, holding frame 2's result back until the main thread has asked to cancel: the cancel
        then lands mid-job however fast the service mattes (3 small frames take ~0.1 s, less than a poll or two)."""

        def __init__(self, client, thread_of):
            self._client, self._thread_of = client, thread_of

        def matte_stream(self, *args, **kwargs):
            for result in self._client.matte_stream(*args, **kwargs):
                deadline = time.monotonic() + 30
                while not self._thread_of().cancel_requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                yield result

        def __getattr__(self, name):
            return getattr(self._client, name)

    def run(cancel_after: int | None) -> dict:
        prepared = jobs.prepare_matte(scene)
        holder = []
        connect = (lambda: service.connect(settings)) if cancel_after is None else \
            (lambda: HeldSecondFrame(service.connect(settings), lambda: holder[0]))
        thread = worker.JobThread(prepared.job, connect, lambda exc: service.describe_error(exc, settings))
        holder.append(thread)
        running = jobs.start(prepared, thread)
        deadline = time.monotonic() + 120
        while running.outcome is None and time.monotonic() < deadline:
            if cancel_after is not None and thread.last_progress and thread.last_progress.done >= cancel_after:
                thread.cancel()
            jobs._poll_running()           # what bpy.app.timers calls every 0.1 s in the UI
            time.sleep(0.02)
        return {"outcome": list(running.outcome) if running.outcome else None,
                "files": sorted(os.listdir(prepared.job.output_dir))}

    out["full"] = run(None)
    for name in out["full"]["files"]:
        os.remove(os.path.join(jobs.output_dir_for(scene.oavm, jobs.clip_id_for(scene.oavm, jobs.find_plates(
            scene, scene.oavm))), name))
    out["cancelled"] = run(1)
    return out


def scenario_movie(args: dict) -> dict:
    """A Movie Clip from a movie file (lossless FFV1, made here from the plates), decoded by Blender for the job."""
    out = {"install": install(args["zip"])}
    set_preferences(args["endpoint"])
    scene = plate_scene(args)
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "oavm-plates-*")))
    movie = encode_movie(args)
    clip = bpy.data.movieclips.load(movie)
    settings = scene.oavm
    settings.source_type, settings.clip = "CLIP", clip
    settings.clip_id = "movie-test"
    settings.range_mode, settings.frame_start, settings.frame_end = "CUSTOM", 1, 3
    out["clip"] = {"source": clip.source, "size": list(clip.size), "frames": clip.frame_duration}
    handlers = len(bpy.app.handlers.render_write)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        out["run"] = run_operator(bpy.ops.oavm.matte_clip)
    out["decode_lines"] = [line for line in console.getvalue().splitlines() if "decoding" in line]
    out["handlers_left"] = len(bpy.app.handlers.render_write) - handlers
    folder = os.path.join(args["work"], "oavm", "movie-test")
    out["files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out["folder"] = folder
    out["temp_plates_left"] = sorted(set(glob.glob(os.path.join(tempfile.gettempdir(), "oavm-plates-*"))) - temp_before)
    return out


def encode_movie(args: dict) -> str:
    scene = bpy.data.scenes.new("encode")
    editor = scene.sequence_editor_create()
    strips = editor.strips if hasattr(editor, "strips") else editor.sequences
    strip = strips.new_image("plates", os.path.join(args["plates"], "plate_0001.png"), 1, 1)
    for i in range(2, args["frames"] + 1):
        strip.elements.append(f"plate_{i:04d}.png")
    scene.frame_start, scene.frame_end = 1, args["frames"]
    scene.render.resolution_x, scene.render.resolution_y = args["width"], args["height"]
    scene.render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "VIDEO"
    settings.file_format = "FFMPEG"
    settings.color_mode = "RGB"
    scene.render.ffmpeg.format, scene.render.ffmpeg.codec = "MKV", "FFV1"
    scene.render.filepath = os.path.join(args["work"], "plate_")
    bpy.ops.render.render(animation=True, scene=scene.name)
    bpy.data.scenes.remove(scene)
    return next(os.path.join(args["work"], f) for f in os.listdir(args["work"]) if f.endswith(".mkv"))


def main() -> int:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        out = globals()[f"scenario_{name}"](args)
    except Exception:  # noqa: BLE001 - reported to the test as data, with the traceback
        out = {"crashed": traceback.format_exc()}
    out["blender"] = bpy.app.version_string
    print(RESULT + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
