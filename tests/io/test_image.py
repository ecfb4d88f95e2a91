"""Tests for gigapatch.io.image: reading any image mode as uint8 (H, W, C), atomic PNG writes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigapatch.core.errors import DataError
from gigapatch.io.image import read_image, write_mask_blocks, write_png
from gigapatch.io.readers import open_image


def _rng_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_grayscale_png_round_trip_gives_one_channel(tmp_path: Path) -> None:
    array = _rng_image((17, 23))
    path = write_png(tmp_path / "gray.png", array)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (17, 23, 1)
    np.testing.assert_array_equal(out[:, :, 0], array)


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    array = _rng_image((9, 11, 3))
    out = read_image(write_png(tmp_path / "rgb.png", array))
    assert out.shape == (9, 11, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    array = _rng_image((8, 8, 4))
    out = read_image(write_png(tmp_path / "rgba.png", array))
    np.testing.assert_array_equal(out, array[:, :, :3])


def test_la_and_bilevel_become_one_channel(tmp_path: Path) -> None:
    gray = _rng_image((6, 7))
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[:, :, 0], gray)

    bits = _rng_image((6, 7)) > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    out = read_image(tmp_path / "bits.png")
    assert out.shape == (6, 7, 1)
    np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))


def test_palette_image_becomes_rgb_with_palette_colours(tmp_path: Path) -> None:
    img = Image.new("P", (4, 3))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (3 * 253))
    indices = np.array([[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]], dtype=np.uint8)
    img.putdata(indices.ravel().tolist())
    img.save(tmp_path / "pal.png")
    out = read_image(tmp_path / "pal.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.uint8)[indices] * 255)


def test_sixteen_bit_grayscale_is_scaled_to_uint8(tmp_path: Path) -> None:
    # v -> round(v / 257): 0..65535 maps onto 0..255; 128/257 rounds down, 129/257 up.
    values = np.array([[0, 257, 257 * 100, 128], [257 * 200, 65535, 129, 65534]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and out.shape == (2, 4, 1)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 100, 0], [200, 255, 1, 255]])


def test_cmyk_tiff_becomes_rgb(tmp_path: Path) -> None:
    rgb = Image.fromarray(_rng_image((5, 5, 3)))
    rgb.convert("CMYK").save(tmp_path / "cmyk.tif")
    out = read_image(tmp_path / "cmyk.tif")
    expected = np.asarray(Image.open(tmp_path / "cmyk.tif").convert("RGB"))
    np.testing.assert_array_equal(out, expected)


def test_float_image_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(path)
    with pytest.raises(DataError, match="floating-point") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match="not found") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory"):
        read_image(tmp_path)


def test_garbage_bytes_cannot_be_decoded(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match="cannot be decoded") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_png_cannot_be_decoded(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rng_image((64, 64))).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="cannot be decoded") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_decompression_bomb_guard_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_png(tmp_path / "big.png", np.zeros((64, 64), dtype=np.uint8))
    # Pillow raises above 2 * MAX_IMAGE_PIXELS; 64 * 64 = 4096 > 2 * 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="tiled TIFF") as info:
        read_image(path)
    assert str(path) in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)


def test_write_png_is_deterministic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    array = _rng_image((20, 30, 3))
    first = write_png(tmp_path / "sub" / "a.png", array).read_bytes()
    second = write_png(tmp_path / "sub" / "a.png", array).read_bytes()
    assert first == second
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.png"]


def test_write_png_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_png(tmp_path / "a.png", np.full((4, 4), 7, dtype=np.uint8))
    before = path.read_bytes()

    def broken_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(path, np.zeros((4, 4), dtype=np.uint8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), np.zeros(4, np.uint8)],
)
def test_write_png_rejects_bad_arrays(tmp_path: Path, array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", array)
    assert not (tmp_path / "bad.png").exists()


def test_a_tiff_mask_is_written_block_by_block_with_a_pyramid(tmp_path: Path) -> None:
    """Level 0 equals the blocks; each reduced level is every 2nd id of the one above (ids
    picked, not averaged), down to one 64-px tile; gigapatch's reader sees the levels."""
    ids = np.random.default_rng(0).integers(0, 5, (300, 200), dtype=np.uint8)
    blocks = ((y, x, ids[y : y + 64, x : x + 64]) for y in range(0, 300, 64)
              for x in range(0, 200, 64))
    path = write_mask_blocks(tmp_path / "mask.tiff", (300, 200), 64, blocks)
    with tifffile.TiffFile(path) as tif:
        levels = [np.asarray(level.asarray()) for level in tif.series[0].levels]
    assert [lv.shape for lv in levels] == [(300, 200), (150, 100), (75, 50), (38, 25)]
    for i, level in enumerate(levels):
        assert np.array_equal(level, ids[:: 2**i, :: 2**i]), i
    reader = open_image(path)
    assert reader.levels == [(300, 200), (150, 100), (75, 50), (38, 25)]
    assert not list(tmp_path.glob("*.level0*")) and not list(tmp_path.glob(".*"))
