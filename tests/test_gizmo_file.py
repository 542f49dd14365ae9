# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM.gizmo parsed as Nuke reads it (a TCL script of ``Class { knob value ... }`` blocks and a node stack),
checked against the names the Python layer uses (plugin_nuke/oavm_nuke/gizmo.py), plus the plug-in's Python
files parsed as Nuke 13's Python 3.7 would.

The parser here is also what tests/test_nuke_layer.py builds its stand-in gizmo from. Stack rule (as Nuke writes
scripts): a node with N inputs pops N nodes and the top of the stack becomes input 0; ``set V [stack 0]`` names the
top, ``push $V`` pushes it again.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugin_nuke"
GIZMO = PLUGIN / "OAVM.gizmo"
sys.path.insert(0, str(PLUGIN))

from oavm_nuke import gizmo as G  # noqa: E402

# addUserKnob type ids, from the NDK's knob-type table (DDImage Knobs.h), independently of gizmo.py
NUKE_KNOB_IDS = {1: "String_Knob", 2: "File_Knob", 3: "Int_Knob", 4: "Enumeration_Knob", 6: "Boolean_Knob",
                 7: "Double_Knob", 11: "Channel_Knob", 20: "Tab_Knob", 22: "PyScript_Knob", 26: "Text_Knob",
                 41: "Link_Knob"}
KNOWN_NODE_CLASSES = {"Input", "Output", "Crop", "Dot", "Copy", "Read", "Premult", "Switch", "Write"}
CHANNEL_KNOBS = {"Copy": {"from0", "to0", "from1", "to1", "from2", "to2", "from3", "to3"},
                 "Premult": {"alpha"}}


# ------------------------------------------------------------------------------------------------ parser

def tokenize(text: str) -> list:
    """Words, "quoted strings" (escapes kept), {braced groups} and [bracketed commands] as single tokens;
    newlines as "\\n" tokens. Raises on unbalanced braces or an unterminated quote."""
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            tokens.append("\n")
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#" and (not tokens or tokens[-1] == "\n"):
            while i < n and text[i] != "\n":
                i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError("unterminated quote at offset %d" % i)
            tokens.append(text[i:j + 1])
            i = j + 1
        elif c in "{[":
            close = "}" if c == "{" else "]"
            depth, j = 0, i
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text[j] == '"':     # quotes inside braces (e.g. help texts) may hold braces
                    j += 1
                    while j < n and text[j] != '"':
                        j += 2 if text[j] == "\\" else 1
                elif text[j] == c:
                    depth += 1
                elif text[j] == close:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth != 0 or j >= n:
                raise ValueError("unbalanced %s opened at offset %d" % (c, i))
            tokens.append(text[i:j + 1])
            i = j + 1
        elif c in "}]":
            raise ValueError("unbalanced %s at offset %d" % (c, i))
        else:
            j = i
            while j < n and text[j] not in " \t\r\n{}[]\"":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def lines(tokens: list) -> list:
    out, cur = [], []
    for t in tokens:
        if t == "\n":
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def unquote(token: str) -> str:
    if token.startswith('"') and token.endswith('"'):
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), token[1:-1])
    if token.startswith("{") and token.endswith("}"):
        return token[1:-1].strip()
    return token


@dataclass
class UserKnob:
    type_id: int
    name: str
    label: str = ""
    tooltip: str = ""
    value_text: str = ""          # T (script / text / link target)
    menu: list = field(default_factory=list)
    flags: list = field(default_factory=list)


@dataclass
class NkNode:
    cls: str
    knobs: dict                   # knob -> raw value token(s) joined
    user_knobs: list = field(default_factory=list)
    inputs: list = field(default_factory=list)   # NkNode or None, input 0 first

    @property
    def name(self) -> str:
        return self.knobs.get("name", self.cls)


def parse_user_knob(body: str) -> UserKnob:
    toks = [t for t in tokenize(body) if t != "\n"]
    knob = UserKnob(int(toks[0]), unquote(toks[1]))
    i = 2
    while i < len(toks):
        t = toks[i]
        if t in ("l", "t", "T", "M", "R", "N"):
            value = unquote(toks[i + 1])
            if t == "l":
                knob.label = value
            elif t == "t":
                knob.tooltip = value
            elif t == "T":
                knob.value_text = value
            elif t == "M":
                knob.menu = [unquote(v) for v in tokenize(value) if v != "\n"]
            i += 2
        else:
            knob.flags.append(t)
            i += 1
    return knob


def parse_block(cls: str, body: str) -> NkNode:
    node = NkNode(cls, {})
    for line in lines(tokenize(body)):
        key, rest = line[0], line[1:]
        if key == "addUserKnob":
            node.user_knobs.append(parse_user_knob(unquote(rest[0])))
        else:
            node.knobs[key] = " ".join(rest)
    return node


@dataclass
class NkScript:
    group: NkNode                  # the Gizmo block
    nodes: list                    # the nodes inside, in file order
    layers: list                   # add_layer statements
    leftover_stack: list

    def node(self, name: str) -> NkNode:
        found = [n for n in self.nodes if n.name == name]
        assert len(found) == 1, "%d nodes called %s" % (len(found), name)
        return found[0]


def parse_nk(text: str) -> NkScript:
    """Parse a .gizmo: the Gizmo block, then nodes wired by the stack until end_group."""
    statements = lines(tokenize(text))
    group, nodes, layers, stack, variables = None, [], [], [], {}
    for st in statements:
        head = st[0]
        if head == "version":
            continue
        if head == "add_layer":
            layers.append(unquote(st[1]).split())
        elif head == "set":
            assert st[2] == "[stack 0]", st
            variables[st[1]] = stack[-1]
        elif head == "push":
            stack.append(None if st[1] == "0" else variables[st[1].lstrip("$")])
        elif head == "end_group":
            break
        elif len(st) == 2 and st[1].startswith("{"):
            node = parse_block(head, unquote(st[1]))
            if head == "Gizmo":
                group = node
                continue
            default_inputs = 0 if head in ("Input", "Read") else 1
            count = int(node.knobs.get("inputs", default_inputs))
            popped = [stack.pop() for _ in range(count)]      # top of the stack first: input 0
            node.inputs = popped
            nodes.append(node)
            stack.append(node)
        else:
            raise ValueError("unexpected statement %r" % " ".join(st))
    assert group is not None, "no Gizmo block"
    return NkScript(group, nodes, layers, stack)


def load_gizmo() -> NkScript:
    return parse_nk(GIZMO.read_text())


# ------------------------------------------------------------------------------------------------ tests

def test_gizmo_parses_with_balanced_braces_and_known_nodes():
    text = GIZMO.read_text()
    assert text.count("{") == text.count("}")
    script = load_gizmo()
    assert script.group.knobs["inputs"] == "2"
    assert {n.cls for n in script.nodes} <= KNOWN_NODE_CLASSES
    names = [n.name for n in script.nodes]
    assert len(names) == len(set(names)), "node names must be unique"
    assert {n: script.node(n).cls for n in G.NODES} == G.NODES
    assert ["oavm", "oavm.alpha", "oavm.fgmask"] in script.layers


def test_unbalanced_text_is_caught():
    with pytest.raises(ValueError, match="unbalanced"):
        tokenize("Gizmo {\n addUserKnob {20 x}\n")
    with pytest.raises(ValueError, match="unbalanced"):
        tokenize("Dot {\n name x\n}}\n")


def test_every_knob_the_python_layer_uses_exists_with_its_class():
    knobs = {k.name: k for k in load_gizmo().group.user_knobs}
    for name, cls in G.KNOBS.items():
        assert name in knobs, "the gizmo lacks knob %s" % name
        assert NUKE_KNOB_IDS[knobs[name].type_id] == cls, name
        assert G.KNOB_TYPE_IDS[cls] == knobs[name].type_id
    assert knobs["output"].menu == list(G.OUTPUT_CHOICES)
    assert "+INVISIBLE" in knobs["cache_ready"].flags
    for name, k in knobs.items():
        assert k.tooltip or k.type_id in (20, 26) or name == "cache_ready", "knob %s needs a tooltip" % name


def test_buttons_call_functions_of_the_nuke_layer():
    layer = ast.parse((PLUGIN / "oavm_nuke" / "nuke_layer.py").read_text())
    functions = {f.name for f in layer.body if isinstance(f, ast.FunctionDef)}
    for knob in load_gizmo().group.user_knobs:
        if knob.type_id == 22:
            code = knob.value_text
            ast.parse(code)                                   # valid Python after .nk unescaping
            called = re.findall(r"oavm_nuke\.nuke_layer\.(\w+)\(nuke\.thisNode\(\)\)", code)
            assert called and called[0] in functions, code


def test_links_and_expressions_point_at_existing_knobs():
    script = load_gizmo()
    user = {k.name for k in script.group.user_knobs}
    for knob in script.group.user_knobs:
        if knob.type_id == 41:
            node, _, target = knob.value_text.partition(".")
            assert target in CHANNEL_KNOBS[script.node(node).cls], knob.value_text
    for node in script.nodes:
        for value in node.knobs.values():
            for ref in re.findall(r"parent\.(\w+)", value):
                assert ref in user, "%s refers to missing parent.%s" % (node.name, ref)
            for other, _ in re.findall(r"\b([A-Z]\w+)\.(width|height)\b", value):
                script.node(other)


def test_graph_is_wired_as_the_docs_say():
    s = load_gizmo()
    ins = {n.name: [i.name if i else None for i in n.inputs] for n in s.nodes}
    assert ins["SourceOut"] == ["SourceCrop"] and ins["SourceCrop"] == ["Source"]
    assert ins["MaskToAlpha"] == ["Mask", "Mask"] and ins["MaskOut"] == ["MaskCrop"]
    assert ins["CopyAlpha"] == ["Source", "MatteRead"]           # B = plate, A = cached matte
    assert ins["CopyLayer"] == ["Source", "MatteRead"]
    assert ins["OutputSwitch"] == ["PremultAlpha", "PremultLayer"]   # which = output knob index
    assert ins["ReadySwitch"] == ["Source", "OutputSwitch"]       # before analysis: the plate unchanged
    assert ins["Output1"] == ["ReadySwitch"]
    assert s.node("CopyLayer").knobs["to0"] == "oavm.alpha" and s.node("CopyLayer").knobs["to1"] == "oavm.fgmask"
    assert s.node("PremultLayer").knobs["alpha"] == "oavm.alpha"
    assert s.node("Mask").knobs["number"] == "1"
    read = s.node("MatteRead").knobs
    assert read["raw"] == "true" and read["on_error"] == "error"


def test_plugin_python_runs_on_nuke13_python37():
    """The plug-in's files and the shared/ package it vendors (client, protocol, shared memory, write-behind, files)."""
    files = sorted(PLUGIN.rglob("*.py")) + sorted((PLUGIN.parent / "shared").glob("*.py"))
    assert {"init.py", "menu.py", "oavm_batch.py", "nuke_layer.py", "analysis.py", "client.py", "write_behind.py",
            "files.py"} <= {f.name for f in files}
    for path in files:
        ast.parse(path.read_text(), str(path), feature_version=(3, 7))


def test_menu_creates_the_gizmo_by_its_file_name():
    menu = (PLUGIN / "menu.py").read_text()
    assert "nuke.createNode('%s')" % GIZMO.stem in menu and 'nuke.menu("Nodes")' in menu


def test_dist_zip_vendors_shared_and_wheels_that_import(tmp_path):
    """`build.py dist` for the Nuke zip, for this interpreter's Python only (one small download, then cached)."""
    import subprocess
    import zipfile

    sys.path.insert(0, str(REPO / "tools"))
    import dist_nuke
    from oavm_nuke.bootstrap import vendor_folder_name

    here = vendor_folder_name()
    python, platform_ = here[2:].split("-", 1)
    target = dist_nuke.Target(python, platform_)
    assert target in dist_nuke.all_targets() and target.folder == here
    zip_path = dist_nuke.build(tmp_path / "dist", targets=[target])
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "x")
    root = tmp_path / "x" / dist_nuke.TOP
    assert {"OAVM/init.py", "OAVM/menu.py", "OAVM/OAVM.gizmo", "OAVM/oavm_batch.py", "OAVM/shared/client.py",
            "OAVM/shared/protocol.py", "OAVM/LICENSE"} <= set(names)
    assert not any("__pycache__" in n for n in names)
    assert not (PLUGIN / "shared").exists()          # no copy kept in the source tree
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from oavm_nuke.bootstrap import setup_paths; setup_paths(%r)\n"
            "import zmq, msgpack, shared.client\n"
            "print(zmq.__file__); print(msgpack.__file__); print(shared.client.__file__)" % (str(root), str(root)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(root)) for p in out), out     # the vendored copies, not the environment's
    assert sorted(dist_nuke.PLATFORMS) == ["linux-x86_64", "macos-arm64", "macos-x86_64", "windows-x86_64"]
    assert sorted(dist_nuke.PINS) == ["3.10", "3.11", "3.7", "3.9"]   # Nuke 15, 16, 13, 14
