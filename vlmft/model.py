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

from . import attention
from .models import Family, family_for
from .recipe import ModelConfig, RecipeError

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


def load_family(cfg: ModelConfig, data) -> tuple:
    """(HF config, family, processor) of a recipe's model, before any weight is read; RecipeError
    when the family cannot train on this data config (:func:`family_problems`)."""
    config = load_config(cfg)
    fam = family(cfg, config)
    problems = family_problems(fam, data)
    if problems:
        raise RecipeError(problems)
    return config, fam, load_processor(cfg, config)


def load_processor(cfg: ModelConfig, config=None):
    """The model's own processor (chat template, image tiling, image-token expansion)."""
    config = config or load_config(cfg)
    return family(cfg, config).load_processor(cfg.name_or_path, config.model_type, cfg.trust_remote_code)


def model_class(config) -> type | None:
    """The image-text-to-text class transformers builds for ``config`` (None: remote code)."""
    try:
        return AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        return None


def attention_kernel(cfg: ModelConfig, config=None) -> str:
    """``model.attn_implementation`` resolved for this model and machine (vlmft/attention.py);
    RecipeError (one line) for a kernel that cannot run here."""
    config = config or load_config(cfg)
    try:
        return attention.resolve(cfg.attn_implementation, model_class(config), attention.cuda_capability())
    except attention.KernelError as exc:
        raise RecipeError([str(exc)]) from None


def load_model(cfg: ModelConfig, precision: str = "fp32", quantization=None):
    """Weights from the folder or hub, in the dtype given, with training-safe settings and the
    resolved attention kernel.

    Training loads in its own dtype (vlmft/train.py): DeepSpeed casts the parameters to bf16/fp16
    before it makes its fp32 master partitions from them at every ZeRO stage, so an fp32 load
    only doubled host memory. Under ZeRO-3 the caller wraps this in ``engine.zero3_init`` and
    every parameter is partitioned as it is built (no rank holds the whole model).

    ``use_cache`` is switched off on the model and its text config: with a cache, transformers
    does not detect packed sequences from restarting position ids and samples in a row attend
    to each other (a 0.5 logit difference measured on the demo model). ``quantization``: a
    transformers quantization config (QLoRA, vlmft/lora.py), loaded onto this rank's GPU.
    """
    config = load_config(cfg)
    extra = {}
    if quantization is not None:
        extra = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.name_or_path, dtype=DTYPES[precision], attn_implementation=attention_kernel(cfg, config),
        trust_remote_code=cfg.trust_remote_code, **extra)
    _keep_used_conversions(model)
    disable_cache(model)
    enable_gradient_checkpointing(model, cfg.gradient_checkpointing, family(cfg, model.config))
    return model


def _keep_used_conversions(model) -> None:
    """The checkpoint key renamings save_pretrained reverts (an export keeps the checkpoint's key
    names): transformers' plain load keeps those that matched a key, its ZeRO-3 load every one
    it tried, and reverting those unused ones wrote other names (Qwen2.5-VL's legacy folder)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and all(callable(getattr(c, "was_used", None)) for c in conversions):
        model._weight_conversions = [c for c in conversions if c.was_used()]


def attention_note(model, gradient_checkpointing: str, row_tokens: int | None) -> str | None:
    """The warning for sdpa's dense mask on packed rows of ``row_tokens`` (None: not packed)
    when it is large (vlmft/attention.py); None otherwise."""
    if not row_tokens:
        return None
    text = model.config.get_text_config()
    return attention.dense_mask_note(text._attn_implementation, row_tokens, text.num_hidden_layers,
                                     next(model.parameters()).element_size(),
                                     recomputed=gradient_checkpointing in ("language", "both"))


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
