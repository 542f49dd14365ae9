# SPDX-License-Identifier: GPL-3.0-or-later
"""COCO's instances annotations (the usual download) as the image_seg dataset: polygons and RLE become the same
instance masks the panoptic loader gives, checked pixel by pixel on hand-made cases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from oavm_service.errors import OAVMInputError
from oavm_service.train import data as D
from oavm_service.train import loop


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE, written from its definition (pycocotools' rleToString), to check the reader against."""
    out = []
    for i, run in enumerate(counts):
        x = run - counts[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_polygons_fill_the_pixels_whose_centres_are_inside():
    square = D.segmentation_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 6, 8)          # x 1..5, y 1..4
    expected = np.zeros((6, 8), bool)
    expected[1:4, 1:5] = True
    assert np.array_equal(square, expected)
    triangle = D.polygon_mask(np.array([[0, 0], [8, 0], [0, 8]], float), 8, 8)   # x + y < 8 at pixel centres
    yy, xx = np.mgrid[0:8, 0:8]
    assert np.array_equal(triangle, (xx + 0.5) + (yy + 0.5) < 8)
    two_parts = D.segmentation_mask([[0, 0, 2, 0, 2, 2, 0, 2], [1, 1, 4, 1, 4, 3, 1, 3]], 5, 5)
    assert two_parts.sum() == 4 + 6 - 1                                   # parts of one object are united


def test_rle_in_both_forms_reads_column_major_runs():
    counts = [5, 3, 10, 2, 7]                                             # 27 pixels: 3 rows x 9 columns
    flat = np.concatenate([np.full(n, k % 2, bool) for k, n in enumerate(counts)])
    expected = flat.reshape(9, 3).T
    assert np.array_equal(D.rle_mask({"counts": counts, "size": [3, 9]}), expected)
    text = _rle_string(counts)
    assert D.rle_counts_from_string(text) == counts
    assert np.array_equal(D.rle_mask({"counts": text, "size": [3, 9]}), expected)
    big = [40000, 123, 7, 70000, 1, 1]                                    # runs that need several characters
    assert D.rle_counts_from_string(_rle_string(big)) == big
    with pytest.raises(OAVMInputError, match="damaged"):
        D.rle_mask({"counts": [5, 3], "size": [3, 9]})


def _write_coco(root: Path) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    pixels = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    out = oiio.ImageOutput.create(str(root / "train2017" / "a.jpg"))
    assert out.open(str(root / "train2017" / "a.jpg"), oiio.ImageSpec(60, 40, 3, oiio.UINT8))
    assert out.write_image(pixels) and out.close()
    blob = np.zeros((40, 60), bool)
    blob[5:25, 30:50] = True                                                # an RLE instance, 400 px
    runs, value, n = [], False, 0
    for v in blob.T.reshape(-1):
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 60},
                   {"id": 8, "file_name": "b.jpg", "height": 40, "width": 60}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 300,
             "segmentation": [[2, 2, 22, 2, 22, 17, 2, 17]]},                # a polygon, 300 px
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 400,
             "segmentation": {"counts": _rle_string(runs), "size": [40, 60]}},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 900,
             "segmentation": {"counts": [0, 2400], "size": [40, 60]}},      # a crowd: not an object
            {"id": 4, "image_id": 8, "category_id": 1, "iscrowd": 0, "area": 10,
             "segmentation": [[0, 0, 3, 0, 3, 3]]},                          # too small: b.jpg has no object
        ],
        "categories": [{"id": 1, "name": "person"}]}))


def test_coco_instances_become_the_image_seg_dataset(tmp_path: Path):
    _write_coco(tmp_path)
    images = D.coco_instances(tmp_path, min_area=100)
    assert len(images) == 1 and images[0].segment_ids == [2, 1]           # largest first; crowd and tiny left out
    ids = images[0].id_map()
    assert (ids == 1).sum() == 300 and (ids == 2).sum() == 400 and set(np.unique(ids)) == {0, 1, 2}
    recipe = loop.recipe_from_dict({
        "name": "coco", "train": {"seed": 0},
        "datasets": {"coco": {"kind": "image_seg", "format": "instances", "root": str(tmp_path), "min_area": 100}},
        "stages": [{"name": "s", "datasets": {"coco": 1}, "size": [32, 48], "clip_length": 2, "steps": 1}]})
    sampler = loop.build_sampler("coco", recipe.datasets["coco"], recipe, (32, 48), log=lambda _: None)
    clip = sampler.sample(np.random.default_rng(3), 2, (32, 48))
    assert clip.frames.shape == (2, 32, 48, 3) and clip.instances.shape[:2] == (2, 2)
    assert all(clip.instances[0, k].any() for k in range(2))             # both objects survive the crop
    recipe.datasets["coco"]["format"] = "lvis"
    with pytest.raises(OAVMInputError, match="panoptic' or 'instances"):
        loop.build_sampler("coco", recipe.datasets["coco"], recipe, (32, 48), log=lambda _: None)
    with pytest.raises(OAVMInputError, match="annotations_trainval2017"):
        D.coco_instances(tmp_path / "missing")
