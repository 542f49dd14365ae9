# SPDX-License-Identifier: GPL-3.0-or-later
"""The gizmo's Nuke layer (plugin_nuke/oavm_nuke/nuke_layer.py) and the farm command (oavm_batch.py), run against
a small stand-in ``nuke`` module and a real OAVM service on loopback.

Nuke itself cannot be installed here. The stand-in is built from the real OAVM.gizmo (parsed by
test_gizmo_file.py) and follows the Nuke Python API reference where the layer touches it: knob classes and what
their setValue accepts (String_Knob, File_Knob, Enumeration_Knob, Boolean_Knob, Int_Knob, Channel_Knob,
ChannelMask_Knob, Link_Knob, PyScript_Knob, Text_Knob), ``node[name]`` raising NameError for a missing knob,
``nuke.nodes.<Class>()`` creating inside the group that was ``begin()``-ed, Write's exr knobs existing only once
``file_type`` is exr, ``nuke.execute(node, first, last, incr)`` on Write nodes, ``nuke.ProgressTask(title)`` with
``setMessage(str)``, ``setProgress(int)`` and ``isCancelled()``. Its ``execute`` really renders: it evaluates the
gizmo's Input/Crop/Dot/Copy nodes on the test's plate and writes EXR files with OpenImageIO.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugin_nuke"
sys.path.insert(0, str(PLUGIN))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_gizmo_file import NUKE_KNOB_IDS, load_gizmo, unquote  # noqa: E402

from tests.helpers.live_service import free_port, live_service  # noqa: E402

FRAMES = list(range(1001, 1005))
SIZE = (48, 64)


# ================================================================================================ stand-in nuke

class Knob:
    accepts: tuple = (str,)

    def __init__(self, name, label="", value=None, node=None):
        self._name, self._label, self.node = name, label, node
        self._value = self.default() if value is None else self.coerce(value)

    def default(self):
        return ""

    def coerce(self, value):
        if isinstance(value, bool) and bool not in self.accepts or not isinstance(value, self.accepts):
            raise TypeError("%s.setValue(%r): expected %s" % (type(self).__name__, value,
                                                              "/".join(t.__name__ for t in self.accepts)))
        return value

    def name(self):
        return self._name

    def value(self):
        return self._value

    def setValue(self, value):
        self._value = self.coerce(value)
        return True


class String_Knob(Knob):
    pass


class File_Knob(String_Knob):
    pass


class Text_Knob(String_Knob):
    pass


class Tab_Knob(Knob):
    pass


class PyScript_Knob(String_Knob):
    pass


class Boolean_Knob(Knob):
    accepts = (bool, int)

    def default(self):
        return False

    def coerce(self, value):
        return bool(super().coerce(value))


class Int_Knob(Knob):
    accepts = (int,)

    def default(self):
        return 0


class Enumeration_Knob(Knob):
    accepts = (str, int)

    def __init__(self, name, label="", values=(), value=None, node=None):
        self.values = list(values)
        super().__init__(name, label, value, node)

    def default(self):
        return self.values[0] if self.values else ""

    def coerce(self, value):
        value = super().coerce(value)
        if isinstance(value, int):
            return self.values[value]
        if value not in self.values:
            raise ValueError("%s: %r is not one of %s" % (self._name, value, self.values))
        return value


class Channel_Knob(Knob):
    def default(self):
        return "none"

    def coerce(self, value):
        value = super().coerce(value)
        if value != "none" and not (value.count(".") == 1 and all(value.split("."))):
            raise ValueError("a channel is 'layer.channel' (e.g. rgba.alpha), not %r" % value)
        return value


class ChannelMask_Knob(Knob):
    SETS = {"rgb": ["rgba.red", "rgba.green", "rgba.blue"], "rgba": ["rgba.red", "rgba.green", "rgba.blue",
                                                                     "rgba.alpha"], "alpha": ["rgba.alpha"]}

    def default(self):
        return "rgb"

    def coerce(self, value):
        value = super().coerce(value)
        if value not in self.SETS:
            raise ValueError("channels %r: use rgb, rgba or alpha" % value)
        return value


class Link_Knob(Knob):
    def __init__(self, name, label="", target="", node=None):
        self.target = target
        super().__init__(name, label, None, node)

    def _linked(self):
        node_name, knob = self.target.split(".")
        return self.node.node(node_name)[knob]

    def value(self):
        return self._linked().value()

    def setValue(self, value):
        return self._linked().setValue(value)


# documented knobs of the node classes the layer and the gizmo use
WRITE_EXR_KNOBS = {"datatype": ["16 bit half", "32 bit float"],
                   "compression": ["none", "Zip (1 scanline)", "Zip (16 scanlines)", "PIZ Wavelet (32 scanlines)",
                                   "RLE", "B44", "B44A", "DWAA", "DWAB"]}


def class_knobs(cls):
    if cls == "Write":
        return [File_Knob("file"), ChannelMask_Knob("channels"),
                Enumeration_Knob("file_type", values=[" ", "exr", "tiff", "png", "jpeg", "dpx"]),
                Boolean_Knob("create_directories")]
    if cls == "Read":
        return [File_Knob("file"), Int_Knob("first"), Int_Knob("last"), Int_Knob("origfirst"), Int_Knob("origlast"),
                Boolean_Knob("raw"), Enumeration_Knob("before", values=["hold", "loop", "bounce", "black"]),
                Enumeration_Knob("after", values=["hold", "loop", "bounce", "black"]),
                Enumeration_Knob("on_error", values=["error", "black", "checkerboard", "nearest frame"])]
    if cls == "Copy":
        return [Channel_Knob("%s%d" % (d, i)) for i in range(4) for d in ("from", "to")]
    if cls == "Premult":
        return [Channel_Knob("alpha", value="rgba.alpha"), ChannelMask_Knob("channels")]
    if cls == "Switch":
        return [Int_Knob("which")]
    if cls == "Input":
        return [Int_Knob("number")]
    if cls == "Crop":
        return [String_Knob("box"), Boolean_Knob("reformat")]
    return []


class FrameRange:
    def __init__(self, first, last):
        self._first, self._last = first, last

    def first(self):
        return self._first

    def last(self):
        return self._last


class Node:
    def __init__(self, nuke, cls, name, parent=None):
        self.nuke, self._cls, self._name, self.parent = nuke, cls, name, parent
        self._knobs = {"name": String_Knob("name", value=name), "disable": Boolean_Knob("disable")}
        for k in class_knobs(cls):
            self.add(k)
        self.inputs, self.children = {}, []
        self.provider = None          # for the test's plate nodes: frame -> {channel: (H, W) array}
        self.frame_range = (1, 1)

    def add(self, knob):
        knob.node = self
        self._knobs[knob.name()] = knob

    def Class(self):
        return self._cls

    def name(self):
        return self._name

    def fullName(self):
        return self._name if self.parent is None or self.parent is self.nuke._root else \
            self.parent.fullName() + "." + self._name

    def __getitem__(self, name):
        if name not in self._knobs:
            raise NameError("knob %s does not exist" % name)
        return self._knobs[name]

    def knob(self, name):
        return self._knobs.get(name)

    def knobs(self):
        return dict(self._knobs)

    def input(self, i):
        return self.inputs.get(i)

    def setInput(self, i, node):
        assert isinstance(i, int) and (node is None or isinstance(node, Node))
        self.inputs[i] = node
        return True

    def frameRange(self):
        return FrameRange(*self.frame_range)

    def node(self, name):
        return next((c for c in self.children if c.name() == name), None)

    def begin(self):
        self.nuke._context.append(self)
        return self

    def end(self):
        assert self.nuke._context[-1] is self, "end() without begin()"
        self.nuke._context.pop()


class ProgressTask:
    def __init__(self, title):
        assert isinstance(title, str)
        self.title, self.messages, self.progress, self.cancel_after = title, [], [], None
        StandInNuke.current.tasks.append(self)

    def setMessage(self, text):
        assert isinstance(text, str)
        self.messages.append(text)

    def setProgress(self, value):
        assert isinstance(value, int) and 0 <= value <= 100, value
        self.progress.append(value)

    def isCancelled(self):
        limit = StandInNuke.current.cancel_after_checks
        self.checks = getattr(self, "checks", 0) + 1
        return limit is not None and self.checks > limit


class StandInNuke(types.ModuleType):
    """A module object installed as ``nuke`` for one test."""
    current = None

    def __init__(self, script_path):
        super().__init__("nuke")
        StandInNuke.current = self
        self._root = Node(self, "Root", "root")
        self._root_name = script_path
        self._context = [self._root]
        self._frame = FRAMES[0]
        self.calls, self.messages, self.tasks, self.deleted = [], [], [], []
        self.cancel_after_checks = None
        self.scripts, self.saved = {}, []
        self.ProgressTask = ProgressTask
        for k in (String_Knob, File_Knob, Text_Knob, Tab_Knob, PyScript_Knob, Boolean_Knob, Int_Knob,
                  Enumeration_Knob, Channel_Knob, ChannelMask_Knob, Link_Knob):
            setattr(self, k.__name__, k)
        outer = self

        class _Nodes:
            def __getattr__(self, cls):
                return lambda **knobs: outer._create(cls, knobs)
        self.nodes = _Nodes()

    # --- API used by the layer
    def root(self):
        root = self._root
        root.name = lambda: self._root_name
        return root

    def frame(self):
        return self._frame

    def thisNode(self):
        raise AssertionError("the layer must be given the node (buttons pass nuke.thisNode())")

    def message(self, text):
        self.messages.append(text)

    def delete(self, node):
        self.deleted.append(node)
        if node.parent is not None:
            node.parent.children.remove(node)

    def execute(self, node, first, last, incr=1, views=None):
        assert isinstance(node, Node) and node.Class() == "Write", "nuke.execute renders Write nodes"
        assert all(isinstance(v, int) for v in (first, last, incr)) and incr > 0 and first <= last
        self.calls.append(("execute", node.name(), first, last, incr))
        for frame in range(first, last + 1, incr):
            self._render_write(node, frame)

    def scriptOpen(self, path):
        self.calls.append(("scriptOpen", path))
        self._root_name = path
        self.scripts[path](self)

    def scriptSave(self, path=None):
        self.saved.append(path or self._root_name)

    def toNode(self, name):
        node = self._root
        for part in name.split("."):
            node = node.node(part) if node else None
        return node

    # --- building scenes
    def _create(self, cls, knobs=None, name=None):
        parent = self._context[-1]
        count = sum(1 for c in parent.children if c.Class() == cls) + 1
        node = Node(self, cls, name or "%s%d" % (cls, count), parent)
        parent.children.append(node)
        for k, v in (knobs or {}).items():
            node[k].setValue(v)
        return node

    def plate(self, name, provider, frame_range):
        node = self._create("Read", name=name)
        node.provider, node.frame_range = provider, frame_range
        return node

    def create_gizmo(self, name="OAVM1"):
        """The OAVM group as Nuke builds it from OAVM.gizmo: user knobs by type id, nodes, wiring."""
        script = load_gizmo()
        group = self._create("Group", name=name)
        for uk in script.group.user_knobs:
            cls = NUKE_KNOB_IDS[uk.type_id]
            if cls == "Enumeration_Knob":
                knob = Enumeration_Knob(uk.name, uk.label, uk.menu)
            elif cls == "Link_Knob":
                knob = Link_Knob(uk.name, uk.label, uk.value_text)
            else:
                knob = getattr(self, cls)(uk.name, uk.label)
                if uk.value_text and cls in ("Text_Knob", "PyScript_Knob"):
                    knob.setValue(uk.value_text)
            group.add(knob)
            if uk.name in script.group.knobs:
                value = unquote(script.group.knobs[uk.name])
                knob.setValue(value == "true" if cls == "Boolean_Knob" else value)
        made = {}
        group.begin()
        for nk in script.nodes:
            node = self._create(nk.cls, name=nk.name)
            for k, v in nk.knobs.items():
                if node.knob(k) is not None and k != "name":
                    knob = node[k]
                    text = unquote(v)
                    if isinstance(knob, Int_Knob):
                        knob.setValue(int(text) if text.lstrip("-").isdigit() else 0)
                    elif isinstance(knob, Boolean_Knob):
                        knob.setValue(text == "true")
                    else:
                        knob.setValue(text)
            made[nk.name] = (node, nk)
        for node, nk in made.values():
            for i, inp in enumerate(nk.inputs):
                if inp is not None:
                    node.setInput(i, made[inp.name][0])
        group.end()
        return group

    # --- rendering (what Nuke's Write would do, for the nodes the gizmo uses)
    def _evaluate(self, node, frame):
        cls = node.Class()
        if node.provider is not None:
            return dict(node.provider(frame))
        if cls == "Input":
            outer = node.parent.input(node["number"].value())
            return self._evaluate(outer, frame) if outer is not None else {}
        if cls in ("Crop", "Dot"):
            return self._evaluate(node.input(0), frame)
        if cls == "Copy":
            b = self._evaluate(node.input(0), frame)
            a = self._evaluate(node.input(1), frame) if node.input(1) else {}
            shape = next(iter((a or b).values())).shape if (a or b) else SIZE
            for i in range(4):
                src, dst = node["from%d" % i].value(), node["to%d" % i].value()
                if src != "none" and dst != "none":
                    b[dst] = a.get(src, np.zeros(shape, np.float32))
            return b
        raise AssertionError("the stand-in cannot render %s" % cls)

    def _render_write(self, write, frame):
        assert write["file_type"].value() == "exr", "set file_type before rendering"
        path = write["file"].value() % frame
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            assert write["create_directories"].value(), "Write: folder %s missing" % folder
            os.makedirs(folder)
        planes = self._evaluate(write.input(0), frame)
        wanted = ChannelMask_Knob.SETS[write["channels"].value()]
        shape = next(iter(planes.values())).shape if planes else SIZE
        names = {"rgba.red": "R", "rgba.green": "G", "rgba.blue": "B", "rgba.alpha": "A"}
        data = np.stack([planes.get(c, np.zeros(shape, np.float32)) for c in wanted], axis=-1)
        spec = oiio.ImageSpec(shape[1], shape[0], len(wanted), "half" if "half" in write["datatype"].value()
                              else "float")
        spec.channelnames = tuple(names[c] for c in wanted)
        spec.attribute("compression", {"Zip (1 scanline)": "zips", "Zip (16 scanlines)": "zip",
                                       "none": "none"}[write["compression"].value()])
        out = oiio.ImageOutput.create(path)
        assert out.open(path, spec)
        out.write_image(data.astype(np.float32))
        out.close()


def _exr_knobs_appear(node):
    """Write's exr-only knobs exist once file_type is exr, as in Nuke (the layer must set file_type first)."""
    original = node["file_type"].setValue

    def set_file_type(value):
        original(value)
        if value == "exr":
            for name, values in WRITE_EXR_KNOBS.items():
                if node.knob(name) is None:
                    node.add(Enumeration_Knob(name, values=values))
        return True
    node["file_type"].setValue = set_file_type
    return node


_orig_create = StandInNuke._create


def _create_with_write_rules(self, cls, knobs=None, name=None):
    node = _orig_create(self, cls, None, name)
    if cls == "Write":
        _exr_knobs_appear(node)
    for k, v in (knobs or {}).items():
        node[k].setValue(v)
    return node


StandInNuke._create = _create_with_write_rules


# ================================================================================================ fixtures

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with live_service(tmp_path_factory.mktemp("nuke_layer_service")) as endpoint:
        yield endpoint


@pytest.fixture
def clip(make_clip):
    return make_clip(frames=len(FRAMES), height=SIZE[0], width=SIZE[1], seed=7)


@pytest.fixture
def nuke(tmp_path, monkeypatch):
    fake = StandInNuke(str(tmp_path / "shots" / "sh010_comp_v001.nk"))
    monkeypatch.setitem(sys.modules, "nuke", fake)
    # a fresh nuke_layer bound to this test's stand-in (also drop the package attribute that caches the old one)
    import oavm_nuke
    monkeypatch.delitem(sys.modules, "oavm_nuke.nuke_layer", raising=False)
    monkeypatch.delattr(oavm_nuke, "nuke_layer", raising=False)
    yield fake


@pytest.fixture
def layer(nuke):
    return importlib.import_module("oavm_nuke.nuke_layer")


def build_scene(nuke, clip, endpoint, *, corrections=None, mask_channel="mask.a"):
    """A plate Read, a roto-like mask node (mask in mask.a; corrections at some frames) and the OAVM gizmo."""
    linear, alphas = clip
    corrections = corrections or {}
    plate = nuke.plate("Plate", lambda f: {c: linear[f - FRAMES[0]][..., i]
                                           for i, c in enumerate(("rgba.red", "rgba.green", "rgba.blue"))},
                       (FRAMES[0], FRAMES[-1]))
    roto = nuke.plate("Roto", lambda f: {"mask.a": corrections.get(f, alphas[0]),
                                         "rgba.alpha": np.zeros(SIZE, np.float32)}, (FRAMES[0], FRAMES[-1]))
    gizmo = nuke.create_gizmo()
    gizmo.setInput(0, plate)
    gizmo.setInput(1, roto)
    gizmo["endpoint"].setValue(endpoint)
    gizmo["mask_channel"].setValue(mask_channel)
    return gizmo


def read_exr(path):
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    px = inp.read_image(0, 0, 0, spec.nchannels, "float")
    inp.close()
    return {n: px[..., i] for i, n in enumerate(spec.channelnames)}


# ================================================================================================ tests

def test_analyze_button_renders_sends_and_shows_the_cache(nuke, layer, service, clip, tmp_path):
    gizmo = build_scene(nuke, clip, service)
    report = layer.analyze(gizmo)
    assert nuke.messages == [] and report.computed == 4
    clip_id = gizmo["clip_id"].value()
    assert clip_id.startswith("sh010_comp_v001.OAVM1-")             # filled in once, kept from then on
    cache = tmp_path / "shots" / "oavm_cache" / clip_id
    read = gizmo.node("MatteRead")
    assert read["file"].value() == (cache / "matte.%04d.exr").as_posix()
    assert (read["first"].value(), read["last"].value()) == (1001, 1004)
    assert gizmo["cache_ready"].value() is True
    assert "analysed 4 frames from 1001" in gizmo["status"].value() and "4/4 frames cached" in gizmo["status"].value()
    # the Mask input's mask.a channel reached the service through MaskToAlpha (the linked mask_channel knob)
    assert gizmo.node("MaskToAlpha")["from0"].value() == "mask.a"
    assert np.abs(read_exr(cache / "prompts" / "mask.1001.exr")["A"] - clip[1][0]).max() < 1e-3
    renders = [c for c in nuke.calls if c[0] == "execute"]
    assert ("execute", "Write1", 1001, 1001, 1) in renders                   # the first-frame mask
    assert any(c[2:] == (1001, 1004, 1) for c in renders)                    # the Source, one chunk
    assert all(n.Class() == "Write" for n in nuke.deleted) and len(nuke.deleted) == len(renders)
    assert gizmo.node("Write1") is None                                      # temporary Writes are gone
    task = nuke.tasks[-1]
    assert task.title == "OAVM: analysing OAVM1" and task.progress[-1] == 100
    assert any("frame 1004 (4/4)" in m for m in task.messages)
    mattes = np.stack([read_exr(cache / ("matte.%04d.exr" % f))["A"] for f in FRAMES])
    assert mattes.shape == (4,) + SIZE and 0 <= mattes.min() and mattes.max() <= 1

    again = layer.analyze(gizmo)
    assert again.computed == 0 and "up to date" in gizmo["status"].value()


def test_reprompt_here_sends_the_mask_at_the_current_frame(nuke, layer, service, clip):
    fix = np.zeros(SIZE, np.float32)
    fix[8:40, 10:30] = 1.0
    gizmo = build_scene(nuke, clip, service, corrections={1003: fix})
    gizmo["frame_range"].setValue("1001-1004")
    layer.analyze(gizmo)
    nuke._frame = 1003
    report = layer.reprompt_here(gizmo)
    assert (report.reused, report.computed) == (2, 2)
    assert "re-prompts at 1003" in gizmo["status"].value()
    assert nuke.tasks[-1].title == "OAVM: re-prompt at frame 1003"
    layer.clear_reprompts(gizmo)
    assert "re-prompts cleared" in gizmo["status"].value()
    assert layer.analyze(gizmo).first_computed == 1003


def test_cancel_button_of_the_progress_dialog(nuke, layer, service, clip):
    gizmo = build_scene(nuke, clip, service)
    nuke.cancel_after_checks = 2
    report = layer.analyze(gizmo)
    assert report.cancelled and "cancelled" in gizmo["status"].value()
    assert gizmo["cache_ready"].value() is True and "missing 1003-1004" in gizmo["status"].value()


@pytest.mark.parametrize("change, says", [
    (lambda g, n: g.setInput(1, None), "Mask input is empty"),
    (lambda g, n: g["frame_range"].setValue("1001-"), "cannot read the frame range"),
    (lambda g, n: (g.setInput(0, None), g["frame_range"].setValue("")), "connect the plate"),
    (lambda g, n: setattr(n, "_root_name", "Root"), "save the script"),
    (lambda g, n: g["clip_id"].setValue("../../etc"), "clip id"),
])
def test_mistakes_are_told_in_a_message_and_the_status_knob(nuke, layer, service, clip, change, says):
    gizmo = build_scene(nuke, clip, service)
    change(gizmo, nuke)
    assert layer.analyze(gizmo) is None
    assert len(nuke.messages) == 1 and says in nuke.messages[0]
    assert gizmo["status"].value().startswith("error:") and says in gizmo["status"].value()
    assert gizmo["cache_ready"].value() is False


def test_no_service_is_reported_with_its_address(nuke, layer, clip, monkeypatch):
    monkeypatch.setenv("OAVM_TIMEOUT_S", "0.5")
    endpoint = "tcp://127.0.0.1:%d" % free_port()
    gizmo = build_scene(nuke, clip, endpoint)
    assert layer.analyze(gizmo) is None
    assert "no OAVM service answers at %s" % endpoint in nuke.messages[0]


def test_farm_command_analyses_headless_and_saves_once(nuke, service, make_clip, tmp_path, capsys):
    clip = make_clip(frames=7, height=SIZE[0], width=SIZE[1], seed=8)
    script = str(tmp_path / "shots" / "farm.nk")
    os.makedirs(os.path.dirname(script))
    open(script, "w").close()
    nuke.scripts[script] = lambda n: build_scene(n, clip, service)
    sys.modules.pop("oavm_batch", None)
    batch = importlib.import_module("oavm_batch")
    assert batch.main([script, "OAVM1", "1001-1007x3"]) == 0
    assert nuke.saved == [script]
    out = capsys.readouterr().out
    assert "analysed 3 frames" in out and "[oavm] 100%" in out
    assert any(c[0] == "execute" and c[2:] == (1001, 1007, 3) for c in nuke.calls)   # a stepped range
    cache = tmp_path / "shots" / "oavm_cache"
    assert sorted(p.name for p in cache.glob("*/matte.*.exr")) == ["matte.1001.exr", "matte.1004.exr",
                                                                    "matte.1007.exr"]
    # the render job opens the saved script: here the scene is rebuilt with the knobs the analysis set
    gizmo = nuke.toNode("OAVM1")
    filled = {k: gizmo[k].value() for k in ("clip_id",)}
    nuke.scripts[script] = lambda n: build_scene(n, clip, service).__getitem__("clip_id").setValue(
        filled["clip_id"])
    nuke._root.children.clear()
    assert batch.main([script, "OAVM1", "1001-1007x3", "--no-save"]) == 0
    assert "up to date" in capsys.readouterr().out and nuke.saved == [script]
    assert batch.main([script, "NoSuchNode"]) == 2
    assert "no OAVM node called 'NoSuchNode'" in capsys.readouterr().err
