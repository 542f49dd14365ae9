# SPDX-License-Identifier: GPL-3.0-or-later
"""Image, mask, colour and movie I/O (oavm_service.io): real files through OpenImageIO and PyAV."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import av
import numpy as np
import OpenImageIO as oiio
import pytest

from oavm_service.errors import OAVMInputError
from oavm_service.io import FrameSource, InputColorspace
from oavm_service.io.colour import linear_to_srgb, srgb_to_linear, to_network_rgb
from oavm_service.io.images import (Window, align_to_window, palette_indices, read_header, read_image, read_mask,
                                    verify_image, write_image)
from oavm_service.io.movies import MovieReader, write_movie

RNG = np.random.default_rng(0)


def write_png_palette(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> Path:
    """A real indexed-colour PNG (colour type 3), built byte by byte so the test does not trust our reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = indices.shape
    raw = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
           + chunk(b"PLTE", bytes(c for rgb in palette for c in rgb)) + chunk(b"IDAT", zlib.compress(raw))
           + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def oiio_read(path: Path) -> tuple[oiio.ImageSpec, np.ndarray]:
    """Read with OpenImageIO directly (not through the module under test)."""
    config = oiio.ImageSpec()
    config.attribute("oiio:UnassociatedAlpha", 1)              # the stored values, not premultiplied ones
    inp = oiio.ImageInput.open(str(path), config)
    assert inp is not None, oiio.geterror()
    spec = inp.spec()
    pixels = inp.read_image(format=oiio.FLOAT)
    inp.close()
    return spec, pixels


# ------------------------------------------------------------------------------------------------ EXR


def test_exr_layers_windows_and_metadata_round_trip(tmp_path):
    alpha = RNG.random((48, 64), dtype=np.float32)
    fgmask = (alpha > 0.5).astype(np.float32)
    data, display = Window(10, 5, 64, 48), Window(0, 0, 100, 80)
    out = write_image(tmp_path / "matte.1001.exr", np.stack([alpha, fgmask], -1), ["hero.A", "hero.fgmask"],
                      data_window=data, display_window=display,
                      metadata={"oavm:version": "0.1.0", "oavm:source_frame_number": 1001})
    spec, pixels = oiio_read(out)
    assert set(spec.channelnames) == {"hero.A", "hero.fgmask"}
    assert (spec.x, spec.y, spec.width, spec.height) == (10, 5, 64, 48)
    assert (spec.full_x, spec.full_y, spec.full_width, spec.full_height) == (0, 0, 100, 80)
    assert str(spec.format) == "half" and spec.get_string_attribute("compression") == "zip"
    assert spec.getattribute("oavm:version") == "0.1.0" and spec.getattribute("oavm:source_frame_number") == 1001
    names = list(spec.channelnames)
    np.testing.assert_allclose(pixels[..., names.index("hero.A")], alpha, atol=1e-3)
    np.testing.assert_array_equal(pixels[..., names.index("hero.fgmask")], fgmask)

    image = read_image(out)                                    # and our reader agrees
    assert image.data_window == data and image.display_window == display and image.is_float
    np.testing.assert_allclose(image.channel("hero.A"), alpha, atol=1e-3)
    assert verify_image(out, channels=["hero.fgmask", "hero.A"], data_window=data, display_window=display) is None
    assert "channels" in verify_image(out, channels=["matte.A", "matte.fgmask"], data_window=data)
    assert "data window" in verify_image(out, channels=["hero.A", "hero.fgmask"], data_window=Window(0, 0, 64, 48))
    assert verify_image(tmp_path / "nope.exr", channels=["A"], data_window=data) == "missing"
    assert not list(tmp_path.glob(".*oavm-tmp*"))


def test_two_dimensional_pixels_are_not_scrambled(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    ramp[10, :] = 0.25                                         # a row that betrays any transposition
    _, pixels = oiio_read(write_image(tmp_path / "ramp.exr", ramp, ["A"]))
    assert pixels.shape == (48, 64, 1)
    np.testing.assert_allclose(pixels[..., 0], ramp, atol=1e-3)


def test_png_and_tiff_are_16_bit(tmp_path):
    values = RNG.random((6, 8, 4), dtype=np.float32)
    for name in ("a.png", "a.tif"):
        path = write_image(tmp_path / name, values, ["R", "G", "B", "A"], metadata={"oavm:version": "0.1.0"},
                           straight_alpha=True)
        spec, pixels = oiio_read(path)
        assert str(spec.format) == "uint16" and spec.nchannels == 4
        np.testing.assert_allclose(pixels, values, atol=1 / 65535)
        assert verify_image(path, channels=["R", "G", "B", "A"], data_window=Window(0, 0, 8, 6)) is None
    with pytest.raises(OAVMInputError, match=r"\.exr"):
        write_image(tmp_path / "a.jpg", values, ["R", "G", "B", "A"])


def test_failed_write_leaves_no_file(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises((OAVMInputError, OSError)):
        write_image(tmp_path / "blocker" / "m.exr", np.zeros((4, 4, 1), np.float32), ["A"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_corrupt_files_are_reported_by_name(tmp_path):
    good = write_image(tmp_path / "good.exr", RNG.random((48, 64, 3), dtype=np.float32), ["R", "G", "B"])
    cut = tmp_path / "cut.exr"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OAVMInputError, match=r"cut\.exr.*(corrupt|truncated)"):
        read_image(cut)
    assert "cut.exr" in verify_image(cut, channels=["R", "G", "B"], data_window=Window(0, 0, 64, 48))
    junk = tmp_path / "junk.exr"
    junk.write_bytes(b"not an image" * 10)
    with pytest.raises(OAVMInputError, match=r"junk\.exr"):
        read_image(junk)
    jpeg = Path(__file__).resolve().parents[1] / "samples" / "judo" / "frames" / "00000.jpg"
    short = tmp_path / "short.jpg"
    short.write_bytes(jpeg.read_bytes()[:4000])
    with pytest.raises(OAVMInputError, match=r"short\.jpg"):
        read_image(short)
    with pytest.raises(OAVMInputError, match="does not exist"):
        read_image(tmp_path / "missing.exr")


# ------------------------------------------------------------------------------------------------ masks


def test_palette_png_by_index(tmp_path):
    indices = np.zeros((12, 16), np.uint8)
    indices[2:6, 3:9] = 1
    indices[7:11, 10:15] = 2
    path = write_png_palette(tmp_path / "ids.png", indices, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    np.testing.assert_array_equal(palette_indices(path), indices)
    _, hero = read_mask(path, index=1)
    _, dog = read_mask(path, index=2)
    np.testing.assert_array_equal(hero, indices == 1)
    np.testing.assert_array_equal(dog, indices == 2)
    with pytest.raises(OAVMInputError, match=r"indices 1, 2.*--mask-index"):
        read_mask(path)
    single = write_png_palette(tmp_path / "one.png", (indices == 2).astype(np.uint8) * 1, [(0, 0, 0), (9, 9, 9)])
    np.testing.assert_array_equal(read_mask(single)[1], indices == 2)
    assert palette_indices(write_image(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.float32), list("RGB"))) is None


def test_sample_mask_is_palette_index_one():
    root = Path(__file__).resolve().parents[1] / "samples" / "judo"
    indices = palette_indices(root / "masks" / "00000.png")
    assert indices.shape == (480, 854) and set(np.unique(indices)) == {0, 1}
    _, mask = read_mask(root / "masks" / "00000.png", index=1)
    assert 0.05 < mask.mean() < 0.5


def test_mask_from_alpha_luminance_and_named_channel(tmp_path):
    coverage = RNG.random((12, 16), dtype=np.float32)
    rgba = np.concatenate([np.full((12, 16, 3), 0.3, np.float32), coverage[..., None]], -1)
    np.testing.assert_allclose(read_mask(write_image(tmp_path / "a.png", rgba, list("RGBA"), straight_alpha=True))[1],
                               coverage, atol=1 / 65535)
    grey = write_image(tmp_path / "g.png", coverage, ["Y"])
    np.testing.assert_allclose(read_mask(grey)[1], coverage, atol=1 / 65535)
    opaque = rgba.copy()
    opaque[..., 3] = 1.0
    opaque[..., :3] = coverage[..., None]                      # an opaque alpha holds no mask: luminance is used
    np.testing.assert_allclose(read_mask(write_image(tmp_path / "o.png", opaque, list("RGBA")))[1], coverage,
                               atol=1e-4)
    exr = write_image(tmp_path / "m.exr", np.stack([coverage, 1 - coverage], -1), ["hero.A", "dog.A"])
    np.testing.assert_allclose(read_mask(exr, channel="dog.A")[1], 1 - coverage, atol=1e-3)
    with pytest.raises(OAVMInputError, match=r"no channel 'cat\.A'.*dog\.A"):
        read_mask(exr, channel="cat.A")
    ids = write_image(tmp_path / "ids16.png", (np.arange(12 * 16).reshape(12, 16, 1) % 3) / 65535.0, ["Y"])
    np.testing.assert_array_equal(read_mask(ids, index=2)[1], (np.arange(12 * 16).reshape(12, 16) % 3) == 2)


def test_mask_lines_up_with_a_plate_data_window(tmp_path):
    full = np.zeros((80, 100), np.float32)
    full[20:40, 30:60] = 1.0
    mask_header, mask = read_mask(write_image(tmp_path / "mask.exr", full, ["A"]))
    plate = write_image(tmp_path / "plate.exr", np.zeros((48, 64, 3), np.float32), list("RGB"),
                        data_window=Window(10, 5, 64, 48), display_window=Window(0, 0, 100, 80))
    aligned = align_to_window(mask, mask_header, read_header(plate))
    np.testing.assert_array_equal(aligned, full[5:53, 10:74])
    small_header, small = read_mask(write_image(tmp_path / "small.exr", np.ones((10, 10), np.float32), ["A"]))
    with pytest.raises(OAVMInputError, match="10x10.*64x48"):
        align_to_window(small, small_header, read_header(plate))


# ------------------------------------------------------------------------------------------------ colour


def test_srgb_transfer():
    np.testing.assert_allclose(linear_to_srgb(np.array([0.0, 0.0031308, 0.18, 1.0])),
                               [0.0, 0.04045, 0.4613561, 1.0], atol=1e-5)
    x = np.linspace(0, 4, 1001, dtype=np.float32)
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(x)), x, rtol=1e-5, atol=1e-6)
    rgb = np.array([[[np.nan, np.inf, -1.0], [0.18, 2.0, 0.5]]], np.float32)
    out = to_network_rgb(rgb, InputColorspace.LINEAR)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 1], [0.4613561, 1.0, linear_to_srgb(np.float32(0.5))], atol=1e-5)
    with pytest.raises(OAVMInputError, match="display"):
        InputColorspace.parse("rec2020")


def test_frame_source_applies_srgb_to_float_plates_only(tmp_path):
    linear = RNG.random((12, 16, 3), dtype=np.float32)
    for f in (1, 2):
        write_image(tmp_path / f"plate.{f:04d}.exr", linear, list("RGB"))
        write_image(tmp_path / f"plate.{f:04d}.png", linear, list("RGB"))
    exr = FrameSource(tmp_path / "plate.####.exr")
    assert exr.kind == "sequence" and exr.available_frames() == [1, 2] and exr.missing([1, 2, 3]) == [3]
    plate = exr.read(2)
    np.testing.assert_allclose(plate.rgb, linear, atol=1e-3)
    np.testing.assert_allclose(plate.network_rgb, linear_to_srgb(plate.rgb), atol=1e-6)
    shown = FrameSource(tmp_path / "plate.%04d.exr", colorspace=InputColorspace.DISPLAY).read(1)
    np.testing.assert_allclose(shown.network_rgb, shown.rgb, atol=1e-6)
    png = FrameSource(tmp_path / "plate.@@@@.png").read(1)
    np.testing.assert_allclose(png.network_rgb, png.rgb, atol=1e-6)


# ------------------------------------------------------------------------------------------------ movies


def _tiny_movie(path: Path, n: int = 12) -> Path:
    frames = []
    for i in range(n):
        img = np.zeros((48, 64, 3), np.uint8)
        img[..., 0] = i * 20                                  # a level per frame: tells frames apart
        img[:, : 4 + i * 4, 1] = 200                          # and a bar that grows
        frames.append(img)
    write_movie(path, frames, fps=24)
    return path


def test_movie_frames_by_number_in_any_order(tmp_path):
    path = _tiny_movie(tmp_path / "plate.mp4")
    with av.open(str(path)) as container:                      # the reference: plain sequential decode
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(reference) == 12
    with MovieReader(path, first_frame=1001) as movie:
        assert movie.frames() == list(range(1001, 1013)) and (movie.width, movie.height) == (64, 48)
        for frame in [1001, 1005, 1011, 1010, 1003, 1012, 1001]:   # forwards, backwards, jumps
            got = movie.read(frame)
            assert got.dtype == np.float32 and got.shape == (48, 64, 3)
            np.testing.assert_array_equal(np.rint(got * 255).astype(np.uint8), reference[frame - 1001])
            assert abs(float(got[..., 0].mean()) * 255 - (frame - 1001) * 20) < 6
        with pytest.raises(OAVMInputError, match="1001-1012.*1013"):
            movie.read(1013)
    source = FrameSource(path, first_frame=5)
    assert source.kind == "movie" and source.available_frames() == list(range(5, 17))
    plate = source.read(7)
    np.testing.assert_array_equal(plate.network_rgb, plate.rgb)
    assert plate.source.endswith("plate.mp4@7")
    source.close()


def test_corrupt_movie_is_reported(tmp_path):
    bad = tmp_path / "bad.mov"
    bad.write_bytes(b"\x00\x00\x00\x18ftypqt  " + bytes(200))
    with pytest.raises(OAVMInputError, match=r"bad\.mov"):
        MovieReader(bad)


def test_without_pyav_only_movies_fail_and_they_say_how_to_fix_it(tmp_path):
    """PyAV is imported on first use: a machine without it (a GPU box set up for torch alone) still trains, serves
    and reads image sequences; a movie then gets an install hint instead of an ImportError at start-up."""
    import subprocess
    import sys

    movie = tmp_path / "clip.mp4"
    write_movie(movie, [np.zeros((16, 16, 3), np.uint8)] * 2)
    probe = (
        "import sys; sys.modules['av'] = None\n"          # `import av` now raises ImportError
        "import oavm_service.io, oavm_service.train.data, oavm_service.server\n"
        "from oavm_service.errors import OAVMInputError\n"
        "try:\n"
        f"    oavm_service.io.FrameSource({str(movie)!r})\n"
        "except OAVMInputError as exc:\n"
        "    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "refused: movies need PyAV" in done.stdout and "pip install av" in done.stdout


def test_half_float_plates_convert_through_the_table_to_the_same_values(tmp_path):
    """Every float16 value - NaN, infinities, negatives, denormals, values above 1 - goes through the lookup table to
    exactly what the float32 conversion gives it, in both colour spaces; and a half EXR read from disk gets the
    same network frame as its float32 pixels would."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256, 1).repeat(3, axis=2)
    for space in (InputColorspace.LINEAR, InputColorspace.DISPLAY):
        table = to_network_rgb(every, space)
        direct = to_network_rgb(every.astype(np.float32), space)
        assert table.dtype == np.float32 and np.array_equal(table, direct), space
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-0.2, 3.0, (24, 40, 3)).astype(np.float16)
    pixels[0, 0] = np.nan
    path = tmp_path / "half.exr"
    spec = oiio.ImageSpec(40, 24, 3, oiio.HALF)
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), spec) and out.write_image(pixels) and out.close()
    image = read_image(path)
    assert image.pixel_type == "half"
    expected = to_network_rgb(pixels.astype(np.float32), InputColorspace.LINEAR)
    assert np.array_equal(image.network_rgb(), expected)
    assert np.array_equal(FrameSource(path).read(0).network_rgb, expected)
