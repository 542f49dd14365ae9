# SPDX-License-Identifier: GPL-3.0-or-later
"""Training, evaluation and weight import. Never imported by inference (engine, server, batch, plug-ins).

* ``metrics``    RVM-benchmark alpha metrics (MAD, MSE, Grad, Conn, dtSSD) and DAVIS J / boundary F
* ``evaluate``   ``oavm eval``: scores a checkpoint or a baseline on a folder of clips
* ``import_rvm`` ``oavm import-rvm``: RVM's pretrained ONNX weights -> an OAVM checkpoint
* ``teacher``    RVM (ONNX Runtime) as a teacher: pseudo alpha for clips that only have object masks
* ``data``, ``composition``, ``losses``, ``matcher``, ``loop``: the training pipeline (``oavm train``)
"""
