"""Idefics3 and SmolVLM: images split into crops plus a global view, crops wrapped in text.

The processor writes ``<fake_token_around_image><row_i_col_j><image>...`` per crop (rows and
columns in text, newlines between rows), so an image's expansion holds ordinary text tokens:
the plan takes it from the processor itself. ``pixel_values`` is [1, crops, 3, H, W] and
``pixel_attention_mask`` [1, crops, H, W]: a packed row joins them on dim 1 (crops padded to
a common size, as the processor pads a batch). The text tower is ``model.model.text_model``,
the vision tower ``vision_model``, the projector ``connector``. SmolVLM's processor needs the
``num2words`` package. Packed rows with restarting 1-D positions: exact (2.4e-7).
"""

from .base import Family, pad_cat


class Idefics3(Family):
    name = "idefics3"
    model_types = ("idefics3",)
    processor_names = ("Idefics3Processor",)
    language = "text_model"
    vision = "vision_model"
    vision_keys = ("pixel_values", "pixel_attention_mask")

    def tiles(self, processor, processed, n_images):
        rows = [int(r) for rs in processed["rows"] for r in rs]
        cols = [int(c) for cs in processed["cols"] for c in cs]
        return [r * c + 1 for r, c in zip(rows, cols)]

    def join(self, key, tensors):
        return pad_cat(tensors, 1, (3, 4) if key == "pixel_values" else (2, 3))


class SmolVLM(Idefics3):
    name = "smolvlm"
    model_types = ("smolvlm",)
    processor_names = ("SmolVLMProcessor",)
    video_processors = {"smolvlm": "SmolVLMVideoProcessor"}
