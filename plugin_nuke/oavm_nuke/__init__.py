# SPDX-License-Identifier: GPL-3.0-or-later
"""OAVM for Nuke: plain modules (frame ranges, clip ids, cache, EXR, the request loop) and one Nuke layer.

Only ``nuke_layer`` imports ``nuke``; everything else runs and is tested without Nuke. See docs/nuke.md.
"""
