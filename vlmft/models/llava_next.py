"""LLaVA-NeXT and LLaVA-OneVision: "anyres" grids of patches per image.

An image becomes a base patch plus a grid of patches chosen from ``image_grid_pinpoints``;
``pixel_values`` is [images, patches, 3, H, W], padded to the most patches of the batch (the
model reads each image's patch count from ``image_sizes``). OneVision also takes
``batch_num_images``: per sample its image count, and anyres only for one-image entries (a
summed count over the row would switch anyres off and fail), so the processor's own per-image
entries are concatenated. ``model.image_newline`` is a parameter of the model itself, which
vlmft/optim.py places with the projector.
Packed rows with restarting 1-D positions: exact (2.1e-7).
"""

from .base import Family, cat, pad_cat


class LlavaNext(Family):
    name = "llava_next"
    model_types = ("llava_next",)
    processor_names = ("LlavaNextProcessor",)
    vision_keys = ("pixel_values", "image_sizes")

    def tiles(self, processor, processed, n_images):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        ip = processor.image_processor
        size = ip.crop_size if getattr(ip, "crop_size", None) else ip.size
        patch = size.get("height") or size.get("shortest_edge")
        return [int(image_size_to_num_patches(tuple(int(x) for x in s), ip.image_grid_pinpoints, patch))
                for s in processed["image_sizes"]]

    def join(self, key, tensors):
        if key == "pixel_values":  # [images, patches, 3, H, W]: pad the patch count
            return pad_cat(tensors, 0, (1,))
        return cat(tensors, 0)


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    processor_names = ("LlavaOnevisionProcessor",)
    video_processors = {"llava_onevision": "LlavaOnevisionVideoProcessor"}
    vision_keys = ("pixel_values", "image_sizes", "batch_num_images")
