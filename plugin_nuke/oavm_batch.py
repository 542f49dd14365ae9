# SPDX-License-Identifier: GPL-3.0-or-later
"""Farm form of the OAVM gizmo's Analyze button, headless:

    nuke -t plugin_nuke/oavm_batch.py script.nk OAVM1 1001-1100 [--no-save]

Opens the script, analyses node OAVM1 (a node path such as Group1.OAVM1 works too) over the frame range (Nuke
syntax; default: the node's 'frame range' knob, else its Source's range), writes the mattes into the node's cache
folder and, if the node's knobs changed (clip id filled in, MatteRead pointed at the cache), saves the script so
that the render job that follows reads the cache. Exit codes: 0 all frames cached, 1 an error (message on
stderr), 2 bad arguments. Cancelling is Ctrl-C; frames already written stay valid and a rerun resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from oavm_nuke.bootstrap import setup_paths  # noqa: E402

setup_paths(HERE)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nuke -t oavm_batch.py",
                                description="Run an OAVM gizmo's analysis headless (render farms).")
    p.add_argument("script", help="the Nuke script (.nk)")
    p.add_argument("node", help="the OAVM node's name, e.g. OAVM1 or Group1.OAVM1")
    p.add_argument("frames", nargs="?", default=None,
                   help="frame range in Nuke syntax, e.g. 1001-1100 or 1-100x2 (default: the node's knob)")
    p.add_argument("--no-save", action="store_true", help="do not save the script afterwards")
    return p.parse_args(argv)


def _watched(node):
    read = node.node("MatteRead")
    return (node["clip_id"].value(), node["cache_ready"].value(), read["file"].value())


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import nuke

    from oavm_nuke import nuke_layer
    from oavm_nuke.analysis import PrintProgress
    from oavm_nuke.cache import cache_status

    if not os.path.isfile(args.script):
        print("oavm_batch: no script at %s" % args.script, file=sys.stderr)
        return 2
    nuke.scriptOpen(args.script)
    node = nuke.toNode(args.node)
    if node is None or node.knob("analyze") is None:
        print("oavm_batch: %s has no OAVM node called %r; give the node's name as shown in the Node Graph"
              % (args.script, args.node), file=sys.stderr)
        return 2
    before = _watched(node)
    try:
        report = nuke_layer.run_analysis(node, frame_range=args.frames, progress=PrintProgress())
        settings = nuke_layer.settings_of(node, args.frames)
    except nuke_layer.USER_ERRORS + nuke_layer.service_errors() as exc:
        print("oavm_batch: %s" % exc, file=sys.stderr)
        return 1
    print("[oavm] %s" % report.describe())
    state = cache_status(settings.layout, settings.clip_id, settings.frames)
    if not args.no_save and _watched(node) != before:
        nuke.scriptSave()
        print("[oavm] saved %s (the gizmo now reads %s)" % (args.script, settings.layout.matte_pattern))
    if not state.complete:
        print("oavm_batch: %s" % state.describe(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
