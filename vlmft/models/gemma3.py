"""Gemma 3: SigLIP images of fixed size, bidirectional attention inside each image.

The processor writes an image as ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` soft
tokens + ``<end_of_image>\\n\\n``: 6 text tokens around the image tokens, which the plan takes
from the processor (a plan that counted only the image tokens would cut answers short).
``token_type_ids`` (1 on image tokens) switch on bidirectional attention within each image.

transformers' own mask for a packed row is wrong here: its sliding-window layers apply the
image blocks after remapping positions per sample, so a text sample that follows an image
sample attends into it (0.26 logit difference measured). So the packed row gets explicit
masks: full layers ``(causal OR same image) AND same sample``, sliding layers the same AND
within the window, built by transformers' own ``create_causal_mask`` (dense for sdpa/eager,
a block mask for flex attention).
"""

import torch

from .base import Family


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    processor_names = ("Gemma3Processor",)
    token_key = "token_type_ids"

    def tiles(self, processor, processed, n_images):
        crops = processed.get("num_crops")
        return [1 + int(c) for c in crops] if crops is not None else [1] * n_images

    def model_inputs(self, model, batch):
        kw = super().model_inputs(model, batch)
        kw.pop(self.token_key, None)  # the packed row's masks replace the model's own
        return kw

    def attention_mask(self, model, batch, hidden):
        from transformers.masking_utils import and_masks, create_causal_mask, sliding_window_overlay

        sid = batch["sample_ids"].to(hidden.device)
        is_img = batch["tokens"].to(hidden.device) == 1
        start = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
        block = torch.where(is_img, start.long().cumsum(-1), -1)

        def same_sample(b, h, q, kv):
            return sid[b, q] == sid[b, kv]

        def same_image(b, h, q, kv):
            return (block[b, q] == block[b, kv]) & (block[b, q] >= 0)

        cfg = model.config.get_text_config()
        kw = dict(config=cfg, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=None,
                  or_mask_function=same_image)
        masks = {"full_attention": create_causal_mask(**kw, and_mask_function=same_sample)}
        if getattr(cfg, "sliding_window", None):
            masks["sliding_attention"] = create_causal_mask(
                **kw, and_mask_function=and_masks(same_sample, sliding_window_overlay(cfg.sliding_window)))
        return masks
