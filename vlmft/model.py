"""Load an HF vision-language model and its processor: a hub id or a local folder.

The bundled demo model (``demo/model``, made by ``python -m vlmft.demo_assets``) is an ordinary
HF folder, so the demo takes exactly the path a real InternVL or Qwen2.5-VL checkpoint takes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, InternVLProcessor
from transformers.utils import logging as transformers_logging

from .recipe import ModelConfig

transformers_logging.disable_progress_bar()  # "Loading weights" bars would fill our logs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InternVLImageProcessor(InternVLProcessor):
    """InternVL's processor without the video processor.

    The stock ``InternVLProcessor`` insists on a video processor, which needs torchvision; images
    alone need only the (pillow) image processor and the tokenizer. Saved folders name this
    class, which ``AutoProcessor`` cannot resolve, so :func:`load_processor` builds it itself.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                 chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)


def load_config(cfg: ModelConfig):
    return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)


def load_processor(cfg: ModelConfig):
    """The model's own processor (chat template, image tiling, image-token expansion)."""
    proc = AutoProcessor.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if not hasattr(proc, "image_processor"):
        # AutoProcessor fell back to the tokenizer alone: the folder names a processor class
        # it does not know (ours, above) or one whose extra parts are not installed.
        if load_config(cfg).model_type != "internvl":
            raise ValueError(f"model.name_or_path: '{cfg.name_or_path}' has no image processor "
                             "that transformers can load; a VLM folder needs processor_config.json")
        proc = InternVLImageProcessor.from_pretrained(cfg.name_or_path)
    return proc


def load_model(cfg: ModelConfig, precision: str = "fp32"):
    """Weights from the folder or hub, in the training dtype, with training-safe settings.

    ``use_cache`` is switched off on the model and its text config: with a cache, transformers
    does not detect packed sequences from restarting position ids and samples in a row attend
    to each other (DESIGN.md measured a 0.5 logit difference).
    """
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path, dtype=DTYPES[precision], attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code)
    disable_cache(model)
    enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return model


VISION_TOWERS = ("vision_tower", "visual", "vision_model")
LANGUAGE_MODELS = ("language_model", "text_model")


def enable_gradient_checkpointing(model, which: str) -> list[str]:
    """Turn on activation recomputation in the vision tower, the language model or both;
    returns the submodules switched on. Non-reentrant, so frozen towers and packed rows work."""
    if which == "none":
        return []
    wanted = {"vision": VISION_TOWERS, "language": LANGUAGE_MODELS,
              "both": VISION_TOWERS + LANGUAGE_MODELS}[which]
    done = []
    for name, sub in model.model.named_children():
        if name in wanted:
            if not getattr(sub, "supports_gradient_checkpointing", False):
                raise ValueError(f"model.gradient_checkpointing: {type(sub).__name__} ({name}) does not "
                                 "support gradient checkpointing")
            kwargs = {"use_reentrant": False}
            if hasattr(sub, "activation_checkpointing_enable"):  # transformers >= 5.x name
                sub.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            done.append(name)
    if not done:
        raise ValueError(f"model.gradient_checkpointing: no {which} tower found in "
                         f"{type(model).__name__} (looked for {', '.join(wanted)})")
    return done


def meta_model(cfg: ModelConfig):
    """The model built from its config on the meta device: names and shapes, no weights, no
    memory. Enough for ``lr-table`` on a 78B config in seconds."""
    config = load_config(cfg)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return model


def disable_cache(model) -> None:
    model.config.use_cache = False
    text = getattr(model.config, "text_config", None)
    if text is not None:
        text.use_cache = False
