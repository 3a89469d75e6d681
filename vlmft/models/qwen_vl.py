"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and Qwen3.5, unpacked): native-resolution vision, mRoPE.

An image becomes (h/14) x (w/14) patches; every 2 x 2 merge into one ``<|image_pad|>`` token.
Per sample travel ``pixel_values`` (patches, joined on dim 0), ``image_grid_thw`` (one row per
image, dim 0) and ``mm_token_type_ids`` (1 on image tokens).

Position ids of a packed row are ``[4, 1, L]``: row 0 the restarting 1-D ids (transformers
detects the packed samples from it and isolates them), rows 1-3 each sample's own 3-D mRoPE ids
from ``model.model.get_rope_index``, concatenated. Measured against each sample alone: 1.8e-7 to
2.1e-7; with 1-D restarting ids instead: 0.2-0.5 (the image tokens get text positions).

A "tile" here is 256 image tokens (the token count of one 448 px InternVL tile), so
``num_images_expected`` and the balance cost mean about the same work in both families;
``max_tiles_per_image`` caps ``max_pixels`` at that many tiles' worth of pixels.

Qwen3.5 interleaves Gated-DeltaNet (linear attention) layers whose torch fallback ignores
sample boundaries: a packed row leaked 0.022 between samples even with correct positions. It
trains one sample per row (``data.packing.enabled: false``).
"""

import math

import torch

from .base import Family, cat

TOKENS_PER_TILE = 256


class QwenVL(Family):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    processor_names = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
    video_processors = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                        "qwen3_vl": "Qwen3VLVideoProcessor", "qwen3_vl_moe": "Qwen3VLVideoProcessor",
                        "qwen3_5": "Qwen3VLVideoProcessor", "qwen3_5_moe": "Qwen3VLVideoProcessor"}
    vision = "visual"
    vision_keys = ("pixel_values", "image_grid_thw")
    token_key = "mm_token_type_ids"
    tile_kwarg = "max_pixels"

    def image_kwargs(self, processor, max_tiles):
        if not max_tiles:
            return {}
        merge = processor.image_processor.merge_size * processor.image_processor.patch_size
        return {"max_pixels": max_tiles * TOKENS_PER_TILE * merge * merge}

    def tiles(self, processor, processed, n_images):
        merge = processor.image_processor.merge_size ** 2
        return [math.ceil(int(g.prod()) / merge / TOKENS_PER_TILE) for g in processed["image_grid_thw"]]

    def position_ids(self, model, batch):
        """[4, 1, L]: restarting text ids on top of each sample's own mRoPE rows."""
        ids, sids = batch["input_ids"], batch["sample_ids"]
        mm = batch["tokens"]
        grid = (batch.get("vision") or {}).get("image_grid_thw")
        rows, g = [], 0
        bounds = torch.nonzero(sids[0, 1:] != sids[0, :-1]).flatten().add(1).tolist()
        for a, b in zip([0] + bounds, bounds + [ids.shape[1]]):
            n_img = _images_in(mm[0, a:b])
            pos, _ = model.model.get_rope_index(
                ids[:, a:b], mm_token_type_ids=mm[:, a:b],
                image_grid_thw=grid[g:g + n_img] if n_img else None)
            rows.append(pos)
            g += n_img
        return torch.cat([batch["position_ids"][None], cat(rows, 2)], dim=0)


def _images_in(mm_row: torch.Tensor) -> int:
    """Image spans in a sample's mm_token_type_ids (runs of 1)."""
    is_img = mm_row == 1
    return int((is_img[1:] & ~is_img[:-1]).sum()) + int(bool(is_img[0])) if is_img.numel() else 0


class Qwen35(QwenVL):
    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    packing = False
