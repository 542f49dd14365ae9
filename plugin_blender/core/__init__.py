# SPDX-License-Identifier: GPL-3.0-or-later
"""The OAVM Blender add-on's logic, in plain Python modules that never import ``bpy``.

Everything that can go wrong in a matting job (clip ids, frame ranges, mask rasterisation, EXR writing, the job
loop against the OAVM service, the worker thread) lives here, so it is tested without Blender; the add-on's
``bpy`` layer (operators.py, jobs.py, nodes.py, ui.py) only gathers inputs from Blender data and applies results.
"""
