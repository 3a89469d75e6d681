"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed-size image, one token per patch.

Packed rows: images joined on dim 0, restarting 1-D positions: exact.
"""

from .base import Family


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    processor_names = ("LlavaProcessor",)
