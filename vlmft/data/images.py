"""Safe image loading with pillow, giving the pixels transformers' own loader gives.

- Sizes come from the file header (``Image.open`` reads no pixels), so planning a pack costs no
  decode. They are the sizes *after* the EXIF orientation (a 90-degree rotation swaps height and
  width, and the image's token count with them), read without decoding too: from the header's
  EXIF (JPEG, WebP, TIFF), or for a PNG from an ``eXIf`` chunk before its image data or within
  the last ``PNG_EXIF_TAIL`` bytes (where writers put one that follows the image data).
  :func:`load` applies the same orientation, so a sample's tokens equal its plan's. Sizes are
  cached per (path, MAX_PIXELS), least recently used first out, at most ``SIZE_CACHE`` entries.
- Truncated files are caught before any decode by a look at the file's tail: a JPEG must hold
  its end-of-image marker (FFD9) in its last bytes, a PNG its IEND chunk, a GIF its trailer
  byte, a WebP/RIFF file the size its header declares. A full decode still refuses a truncated
  file (``LOAD_TRUNCATED_IMAGES`` stays False) instead of returning half an image.
- The decompression-bomb guard stays on: an image over ``MAX_PIXELS`` (pillow's own limit,
  about 89 MP) is a bad sample, not a frozen worker, checked on the header's size before any
  decode. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is left as it is (its warning is turned
  into an error here, per call); ``MAX_PIXELS`` may be lowered, not raised above pillow's.

Pixels (:func:`load`, :func:`to_rgb`): what ``transformers.image_utils.load_image`` returns
(EXIF orientation applied, then RGB), with transparency composited on white as the processors'
``convert_to_rgb`` does; 16-bit and 32-bit integer greys (modes I;16*, I) are scaled by 1/256
to 8 bits, as pillow reads 16-bit RGB, where pillow's own ``convert`` would clip them to white;
float greys (F) in [0, 1] are scaled by 255 (others clipped to [0, 255]).

:func:`cost` asks the model's processor how many tokens and tiles an image becomes, from its
header size. Every problem is an :class:`ImageProblem` whose ``reason`` is the counted key:
missing_image, empty_image, corrupt_image, truncated_image, image_bomb.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
import weakref
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 89_478_485  # pillow's default guard; a larger image is refused as a bomb
ImageFile.LOAD_TRUNCATED_IMAGES = False
TAIL_BYTES = 1024        # how much of a file's end is read to check it is complete
PNG_EXIF_TAIL = 65536    # how much of a PNG's end is searched for an eXIf chunk after the pixels
SIZE_CACHE = 1 << 16     # header sizes kept (LRU), ~10 MB
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # EXIF orientation
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,   # -> the transpose
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,       # that shows it
             8: Image.Transpose.ROTATE_90}                                       # upright


class ImageProblem(Exception):
    """``reason`` is the counted key: missing_image, empty_image, corrupt_image,
    truncated_image, image_bomb."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes
        return (ImageProblem, (self.reason, self.detail))


def _open(path: str | Path) -> tuple[Image.Image, int]:
    """Open (header only) and check size, emptiness and bomb; return the image and file size."""
    try:
        nbytes = os.stat(path).st_size
    except OSError:
        raise ImageProblem("missing_image", f"{path} not found") from None
    if nbytes == 0:
        raise ImageProblem("empty_image", f"{path} is an empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except IsADirectoryError:
        raise ImageProblem("missing_image", f"{path} is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("image_bomb", f"{path}: more pixels than the decompression-bomb guard "
                           f"allows (MAX_PIXELS={MAX_PIXELS}): {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError from a bad header
        raise ImageProblem("corrupt_image", f"{path}: not a readable image ({exc})") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageProblem("empty_image", f"{path}: {w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise ImageProblem("image_bomb", f"{path}: {w}x{h} pixels > MAX_PIXELS={MAX_PIXELS}")
    return img, nbytes


def _check_complete(path: str | Path, fmt: str | None, nbytes: int) -> None:
    """Raise truncated_image when the file visibly ends early (tail read, no decode)."""
    if fmt not in ("JPEG", "MPO", "PNG", "GIF", "WEBP"):
        return
    with open(path, "rb") as f:
        if fmt == "WEBP":
            head = f.read(8)
            declared = struct.unpack("<I", head[4:8])[0] + 8 if len(head) == 8 else 0
            if nbytes < declared:
                raise ImageProblem("truncated_image", f"{path}: {nbytes} bytes of {declared} declared")
            return
        f.seek(max(0, nbytes - TAIL_BYTES))
        tail = f.read()
    marker = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND", "GIF": b"\x3b"}[fmt]
    if fmt == "GIF":
        ok = tail.rstrip(b"\x00").endswith(marker)
    else:
        ok = marker in tail
    if not ok:
        what = {"PNG": "IEND chunk", "GIF": "trailer"}.get(fmt, "end-of-image marker")
        raise ImageProblem("truncated_image", f"{path}: truncated file ({nbytes} bytes, no {what})")


def _png_tail_exif(path: str | Path, nbytes: int) -> bytes | None:
    """The data of the last complete eXIf chunk in a PNG's last PNG_EXIF_TAIL bytes."""
    with open(path, "rb") as f:
        f.seek(max(0, nbytes - PNG_EXIF_TAIL))
        tail = f.read()
    k = tail.rfind(b"eXIf")
    while k >= 4:
        (n,) = struct.unpack(">I", tail[k - 4:k])
        data, crc = tail[k + 4:k + 4 + n], tail[k + 4 + n:k + 8 + n]
        if len(crc) == 4 and struct.unpack(">I", crc)[0] == zlib.crc32(b"eXIf" + data):
            return data
        k = tail.rfind(b"eXIf", 0, k)
    return None


def orientation(img: Image.Image, path: str | Path, nbytes: int) -> int:
    """The EXIF orientation (1-8; 1 = upright) of an opened image, without decoding pixels."""
    if img.format == "PNG" and "exif" not in img.info:
        # pillow reads a PNG's eXIf that follows the pixel data only when decoding them
        img.info["exif"] = _png_tail_exif(path, nbytes) or b""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception as exc:  # a malformed EXIF block
        raise ImageProblem("corrupt_image", f"{path}: unreadable EXIF data ({exc})") from None
    return value if isinstance(value, int) and value in TRANSPOSE else 1


@functools.lru_cache(maxsize=SIZE_CACHE)
def _size(path: str, max_pixels: int) -> tuple[int, int] | ImageProblem:
    try:
        img, nbytes = _open(path)
        with img:
            _check_complete(path, img.format, nbytes)
            w, h = img.size
            if orientation(img, path, nbytes) >= 5:  # 5-8 turn the image by 90 degrees
                w, h = h, w
        return (h, w)
    except ImageProblem as exc:
        return exc


def size(path: str | Path) -> tuple[int, int]:
    """(height, width) as the model sees the image (EXIF orientation applied), from the header
    only, after the bomb and truncation checks. Cached per path: the same answer (or the same
    ImageProblem) every time."""
    hit = _size(str(path), MAX_PIXELS)
    if isinstance(hit, ImageProblem):
        raise ImageProblem(hit.reason, hit.detail)
    return hit


def processor_kwargs(processor, max_tiles: int) -> dict:
    """The image-processor arguments that cap an image at max_tiles tiles (0 = its default)."""
    if max_tiles and hasattr(processor.image_processor, "max_patches"):
        return {"max_patches": max_tiles}
    return {}


_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cost(processor, path: str | Path, max_tiles: int = 0) -> tuple[int, int]:
    """(tokens, tiles) the processor turns this image into, from the header size alone; cached
    per processor and (height, width, max_tiles)."""
    key = size(path) + (max_tiles,)
    try:
        table = _COSTS.setdefault(processor, {})
    except TypeError:   # not weak-referenceable: no cache
        table = {}
    hit = table.get(key)
    if hit is None:
        mm = processor._get_num_multimodal_tokens(image_sizes=[key[:2]], **processor_kwargs(processor, max_tiles))
        tiles = getattr(mm, "num_image_patches", None) or [1]
        hit = table[key] = (mm.num_image_tokens[0], tiles[0])
    return hit


def load(path: str | Path) -> Image.Image:
    """Decode fully, upright (EXIF orientation) and in RGB (:func:`to_rgb`); a truncated or
    corrupt file raises ImageProblem."""
    img, nbytes = _open(path)
    _check_complete(path, img.format, nbytes)
    turn = TRANSPOSE.get(orientation(img, path, nbytes))
    try:
        img.load()
        rgb = to_rgb(img)
    except Exception as exc:
        reason = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise ImageProblem(reason, f"{path}: {exc}") from None
    return rgb.transpose(turn) if turn is not None else rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image from any pillow mode: transparency composited on white (as transformers'
    ``convert_to_rgb``), 16/32-bit integer grey scaled by 1/256, float grey from [0, 1]."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(grey, 0, 65535) >> 8).astype(np.uint8))
    elif mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        scale = 255.0 if grey.size and np.nanmax(grey) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(grey) * scale), 0, 255).astype(np.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
