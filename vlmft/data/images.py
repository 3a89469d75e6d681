"""Safe image loading with pillow.

- Sizes come from the file header (``Image.open`` reads no pixels), so planning a pack costs no
  decode.
- The decompression-bomb guard stays on (pillow's limit, about 179 MP, or ``MAX_PIXELS``):
  a bomb is a bad sample, not a frozen worker.
- Truncated files fail (``LOAD_TRUNCATED_IMAGES`` stays False) instead of decoding half an image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile

MAX_PIXELS = 89_478_485  # pillow's default guard; a larger image is refused as a bomb
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageProblem(Exception):
    """``reason`` is the counted key: missing_image, corrupt_image, empty_image, image_bomb."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageProblem("missing_image", str(path))
    if path.stat().st_size == 0:
        raise ImageProblem("empty_image", str(path))
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("image_bomb", f"{path}: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, OSError
        raise ImageProblem("corrupt_image", f"{path}: {exc}") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageProblem("empty_image", str(path))
    if w * h > MAX_PIXELS:
        raise ImageProblem("image_bomb", f"{path}: {w}x{h} pixels")
    return img


def size(path: Path) -> tuple[int, int]:
    """(height, width) from the header only."""
    w, h = _open(path).size
    return h, w


def load(path: Path) -> Image.Image:
    """Decode fully to RGB; a truncated or corrupt file raises ImageProblem."""
    img = _open(path)
    try:
        img.load()
    except Exception as exc:
        raise ImageProblem("corrupt_image", f"{path}: {exc}") from None
    return img.convert("RGB")
