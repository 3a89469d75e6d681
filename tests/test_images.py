"""Images as the model's own loader sees them: transformers' ``load_image`` (EXIF orientation,
then RGB) and, for transparency, its ``convert_to_rgb`` (composited on white) as the processors
apply it; 16-bit, 32-bit and float greys scaled, not clipped to white. The header size agrees
with the decoded image after rotation. The size cache is bounded; pillow's global bomb limit
is left alone."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from vlmft.data import images

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (21, 34), dtype=np.uint8)          # an 8-bit grey picture, H x W
RGB = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (21, 34), dtype=np.uint8)


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


def check(path, reference: np.ndarray):
    got = images.load(path)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), reference)
    assert images.size(path) == reference.shape[:2]           # (height, width) from the header


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "CMYK", "P"])
def test_plain_modes_equal_load_image(tmp_path, mode):
    src = Image.fromarray(RGB).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    src.save(path)
    check(path, np.asarray(load_image(str(path))))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white_as_the_processors_do(tmp_path, mode):
    rgba = Image.fromarray(np.dstack([RGB, ALPHA]))
    if mode == "P":   # a palette with one transparent entry
        src = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        src.info["transparency"] = 3
    else:
        src = rgba.convert(mode)
    path = tmp_path / "x.png"
    src.save(path, transparency=3) if mode == "P" else src.save(path)
    reference = np.asarray(convert_to_rgb(Image.open(path), return_numpy=True))
    assert reference.min() < 255 and (reference == 255).any()     # something was see-through
    check(path, reference)


@pytest.mark.parametrize("mode, suffix, scale", [("I;16", ".png", 257), ("I", ".tif", 257),
                                                 ("F", ".tif", 1 / 255)])
def test_deep_greys_are_scaled_not_clipped(tmp_path, mode, suffix, scale):
    """The same picture stored deeper decodes to the 8-bit picture load_image gives."""
    eight = tmp_path / "grey8.png"
    Image.fromarray(GREY).save(eight)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    deep = tmp_path / f"grey{suffix}"
    Image.fromarray((GREY.astype(np.float64) * scale).astype(dtype)).save(deep)
    assert Image.open(deep).mode == mode
    reference = np.asarray(load_image(str(eight)))
    check(deep, reference)
    if mode != "F":   # what pillow's convert (and so load_image) does to it: clipped to white
        assert (np.asarray(load_image(str(deep))) == 255).mean() > 0.9


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_sizes_follow_it(tmp_path, orientation):
    path = tmp_path / "x.jpg"
    Image.fromarray(RGB).save(path, exif=_exif(orientation), quality=95)
    reference = np.asarray(load_image(str(path)))
    assert reference.shape[:2] == ((34, 21) if orientation >= 5 else (21, 34))
    check(path, reference)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("where", ["before", "after"])
def test_png_exif_before_or_after_the_pixels(tmp_path, where):
    """Pillow reads an eXIf chunk that follows the image data only when decoding; the header
    size must still see it."""
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4 if where == "before" else data.rindex(b"IEND") - 4
    path.write_bytes(data[:at] + _chunk(b"eXIf", _exif(6).tobytes()) + data[at:])
    reference = np.asarray(load_image(str(path)))
    assert reference.shape[:2] == (34, 21)
    check(path, reference)


def test_size_cache_is_bounded_and_pillows_guard_untouched(tmp_path, monkeypatch):
    guard = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path)
    with pytest.raises(images.ImageProblem) as e:
        images.size(path)
    assert e.value.reason == "image_bomb" and Image.MAX_IMAGE_PIXELS == guard
    info = images._size.cache_info()               # functools' LRU: never more than maxsize
    assert info.maxsize == images.SIZE_CACHE and 0 < info.maxsize <= 1 << 20
