"""InternVL (2.5, 3, 3.5 in transformers' own ``InternVLForConditionalGeneration``).

Dynamic tiling: an image becomes 1-12 tiles of 448 px (``max_patches``, InternVL's
``max_dynamic_patch``), each ``image_seq_length`` tokens between ``<img>`` and ``</img>``.
Packed rows: tiles joined on dim 0, restarting 1-D positions: exact (max logit difference
2.4e-7 against each sample alone, fp32).
"""

from .base import Family


class InternVL(Family):
    name = "internvl"
    model_types = ("internvl",)
    processor_names = ("InternVLProcessor",)
    video_processors = {"internvl": "InternVLVideoProcessor"}
    vision_keys = ("pixel_values",)
    tile_kwarg = "max_patches"

    def tiles(self, processor, processed, n_images):
        return [int(n) for n in processed["num_patches"]]
