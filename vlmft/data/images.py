"""Safe image loading with pillow.

- Sizes come from the file header (``Image.open`` reads no pixels), so planning a pack costs no
  decode. They are cached per (path, MAX_PIXELS) for the life of the process: a dataset that
  names the same image in many samples reads its header once.
- Truncated files are caught before any decode by a look at the file's tail: a JPEG must hold
  its end-of-image marker (FFD9) in its last bytes, a PNG its IEND chunk, a GIF its trailer
  byte, a WebP/RIFF file the size its header declares. A full decode still refuses a truncated
  file (``LOAD_TRUNCATED_IMAGES`` stays False) instead of returning half an image.
- The decompression-bomb guard stays on (pillow's limit, about 89 MP, or ``MAX_PIXELS``): a bomb
  is a bad sample, not a frozen worker. It is checked on the header's size, before any decode.

:func:`cost` asks the model's processor how many tokens and tiles an image becomes, from its
header size. Every problem is an :class:`ImageProblem` whose ``reason`` is the counted key:
missing_image, empty_image, corrupt_image, truncated_image, image_bomb.
"""

from __future__ import annotations

import os
import struct
import warnings
import weakref
from pathlib import Path

from PIL import Image, ImageFile

MAX_PIXELS = 89_478_485  # pillow's default guard; a larger image is refused as a bomb
ImageFile.LOAD_TRUNCATED_IMAGES = False
TAIL_BYTES = 1024        # how much of a file's end is read to check it is complete

_SIZES: dict[tuple[str, int], tuple[int, int] | "ImageProblem"] = {}


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
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
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


def size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header only, after the bomb and truncation checks. Cached per
    path: the same answer (or the same ImageProblem) every time."""
    key = (str(path), MAX_PIXELS)
    hit = _SIZES.get(key)
    if hit is None:
        try:
            img, nbytes = _open(path)
            with img:
                _check_complete(path, img.format, nbytes)
                w, h = img.size
            hit = (h, w)
        except ImageProblem as exc:
            hit = exc
        _SIZES[key] = hit
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
    """Decode fully to RGB; a truncated or corrupt file raises ImageProblem."""
    img, nbytes = _open(path)
    _check_complete(path, img.format, nbytes)
    try:
        img.load()
    except Exception as exc:
        reason = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise ImageProblem(reason, f"{path}: {exc}") from None
    return img.convert("RGB")
