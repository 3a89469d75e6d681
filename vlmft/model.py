"""Load an HF vision-language model and its processor: a hub id or a local folder.

The model type (from config.json, read before any weight) picks the family adapter
(vlmft/models/); an unsupported type is one clear line before anything heavy. The bundled demo
model (``demo/model``, made by ``python -m vlmft.demo_assets``) is an ordinary HF folder, so the
demo takes exactly the path a real InternVL or Qwen2.5-VL checkpoint takes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.utils import logging as transformers_logging

from .models import Family, family_for
from .recipe import ModelConfig

transformers_logging.disable_progress_bar()  # "Loading weights" bars would fill our logs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_config(cfg: ModelConfig):
    return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)


def family(cfg: ModelConfig, config=None) -> Family:
    """The model's family adapter; UnsupportedModel (one line) for an unknown model type."""
    return family_for((config or load_config(cfg)).model_type)


def family_problems(fam: Family, data) -> list[str]:
    """Recipe settings (``data``: the recipe's DataConfig) this family cannot honour, one line
    each (checked before any weight is read)."""
    out = []
    if data.packing.enabled and not fam.packing:
        out.append(f"data.packing.enabled: {fam.name} models cannot be packed exactly (their linear-attention "
                   "layers ignore sample boundaries); set data.packing.enabled=false")
    if data.max_tiles_per_image and fam.tile_kwarg is None:
        out.append(f"data.max_tiles_per_image: the {fam.name} family has no tile limit to set; leave it at 0")
    return out


def load_processor(cfg: ModelConfig, config=None):
    """The model's own processor (chat template, image tiling, image-token expansion)."""
    config = config or load_config(cfg)
    return family(cfg, config).load_processor(cfg.name_or_path, config.model_type, cfg.trust_remote_code)


def load_model(cfg: ModelConfig, precision: str = "fp32", quantization=None):
    """Weights from the folder or hub, in the training dtype, with training-safe settings.

    ``use_cache`` is switched off on the model and its text config: with a cache, transformers
    does not detect packed sequences from restarting position ids and samples in a row attend
    to each other (a 0.5 logit difference measured on the demo model). ``quantization``: a
    transformers quantization config (QLoRA, vlmft/lora.py), loaded onto this rank's GPU.
    """
    extra = {}
    if quantization is not None:
        extra = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path, dtype=DTYPES[precision], attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code, **extra)
    disable_cache(model)
    enable_gradient_checkpointing(model, cfg.gradient_checkpointing, family(cfg, model.config))
    return model


def enable_gradient_checkpointing(model, which: str, fam: Family) -> list[str]:
    """Turn on activation recomputation in the vision tower, the language model or both;
    returns the submodules switched on. Non-reentrant, so frozen towers and packed rows work."""
    if which == "none":
        return []
    wanted = {"vision": (fam.vision,), "language": (fam.language,), "both": (fam.vision, fam.language)}[which]
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
    family(cfg, config)  # an unsupported model type is refused here too
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return model


def disable_cache(model) -> None:
    model.config.use_cache = False
    text = getattr(model.config, "text_config", None)
    if text is not None:
        text.use_cache = False
