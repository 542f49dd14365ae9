# SPDX-License-Identifier: GPL-3.0-or-later
"""Frame-number patterns and farm frame-range syntax (oavm_service.io.sequences)."""
from __future__ import annotations

import pytest

from oavm_service.errors import OAVMInputError
from oavm_service.io.sequences import FramePattern, format_frame_range, is_pattern, parse_frame_range


@pytest.mark.parametrize("text, frame, expected", [
    ("shot/plate.####.exr", 1001, "shot/plate.1001.exr"),
    ("shot/plate.####.exr", 7, "shot/plate.0007.exr"),
    ("shot/plate.####.exr", 12345, "shot/plate.12345.exr"),      # longer than the padding: written in full
    ("shot/plate.#.exr", 7, "shot/plate.7.exr"),
    ("shot/plate.%04d.exr", 42, "shot/plate.0042.exr"),
    ("shot/plate.%4d.exr", 42, "shot/plate.0042.exr"),
    ("shot/plate.%d.exr", 42, "shot/plate.42.exr"),
    ("shot/plate.@@@.exr", 5, "shot/plate.005.exr"),
    ("shot/plate_@@@@@.dpx", 1001, "shot/plate_01001.dpx"),
    ("shot/plate.####.exr", -5, "shot/plate.-0005.exr"),
    ("shot/####.png", 3, "shot/0003.png"),
])
def test_pattern_notations(text, frame, expected):
    pattern = FramePattern.parse(text)
    assert pattern.is_sequence and is_pattern(text)
    assert str(pattern.path(frame)) == expected
    assert pattern.frame_of(expected) == frame


def test_single_image_is_no_sequence():
    pattern = FramePattern.parse("shot/plate.1001.exr")
    assert not pattern.is_sequence and not is_pattern("shot/plate.1001.exr")
    assert str(pattern.path(5)) == "shot/plate.1001.exr"
    assert pattern.existing_frames() == []


def test_frame_of_rejects_other_names_and_paddings():
    pattern = FramePattern.parse("plate.####.exr")
    assert pattern.frame_of("plate.001.exr") is None          # 3 digits for a 4-digit pattern
    assert pattern.frame_of("plate.00001.exr") is None         # 00001 is not how frame 1 is written
    assert pattern.frame_of("plate.1001.exr.tmp") is None
    assert pattern.frame_of("other.1001.exr") is None
    assert pattern.frame_of(".plate.1001.exr.oavm-tmp-12") is None
    assert FramePattern.parse("plate.%d.exr").frame_of("plate.1.exr") == 1
    assert FramePattern.parse("plate.%d.exr").frame_of("plate.01.exr") is None


def test_existing_frames_lists_only_matching_files(tmp_path):
    for name in ["plate.1001.exr", "plate.1003.exr", "plate.1002.exr", "plate.999.exr", "plate.1004.exr.tmp",
                 ".plate.1005.exr.oavm-tmp-7", "notes.txt", "plate.10000.exr"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "plate.1006.exr").mkdir()                      # a folder is no frame
    pattern = FramePattern.parse(tmp_path / "plate.####.exr")
    assert pattern.existing_frames() == [1001, 1002, 1003, 10000]
    assert FramePattern.parse(tmp_path / "missing" / "plate.####.exr").existing_frames() == []


def test_two_tokens_are_refused():
    with pytest.raises(OAVMInputError, match="exactly one"):
        FramePattern.parse("plate.####.%04d.exr")


@pytest.mark.parametrize("text, expected", [
    ("1-5", [1, 2, 3, 4, 5]),
    ("1001", [1001]),
    ("1-10x2", [1, 3, 5, 7, 9]),
    ("1-10:3", [1, 4, 7, 10]),
    ("1,5,10-12", [1, 5, 10, 11, 12]),
    ("5-3", [5, 4, 3]),
    ("-3--1", [-3, -2, -1]),
    ("-2-1", [-2, -1, 0, 1]),
    (" 1 - 3 , 7 ", [1, 2, 3, 7]),
    ("1-3,2-4", [1, 2, 3, 4]),                                   # duplicates dropped, order kept
    ("10,1,5", [10, 1, 5]),                                       # a farm chunk list is trusted as given
])
def test_frame_ranges(text, expected):
    assert parse_frame_range(text) == expected


def test_long_range_is_complete():
    frames = parse_frame_range("1001-1100")
    assert frames == list(range(1001, 1101))
    assert parse_frame_range("1-100x2") == list(range(1, 101, 2))


@pytest.mark.parametrize("text", ["", "  ", "a-b", "1-10x0", "1--", "1-10x", "1..10", "1-2-3"])
def test_bad_frame_ranges_say_what_to_write(text):
    with pytest.raises(OAVMInputError, match="1001-1100|1 or more"):
        parse_frame_range(text)


@pytest.mark.parametrize("frames, text", [
    ([1, 2, 3, 7], "1-3,7"),
    ([1, 3, 5, 7], "1-7x2"),
    ([5], "5"),
    ([1, 2], "1-2"),
    ([1, 3], "1,3"),
])
def test_format_frame_range_round_trips(frames, text):
    assert format_frame_range(frames) == text
    assert sorted(parse_frame_range(text)) == frames
