"""A packed micro-batch through the model: the loss module DeepSpeed wraps, and the inputs it
takes.

    micro-batch (stream.row)  --model_inputs (host: the family's position ids, its tensors, the
    varlen kernels' cu_seqlens, the supervised rows)-->  to_device  -->  LossModule.forward: the
    family's attention mask (if any), the blank vision input (if the rank has no image),
    model.model(...), the weighted CE sum S_mb (loss.py)

The HF model's own ``labels=`` loss would shift targets across packed samples and average per
micro-batch; the last hidden states go through the head in chunks instead (loss.py). Index
computations are made on the host before the copy, so the step reads nothing back from the
device per micro-batch: Qwen's mRoPE rows (a pass over each sample's token types), the flash
kernels' ``cu_seqlens`` (vlmft/attention.py) and the positions that go through the head.
On CUDA the data loader's workers hand over pinned tensors (vlmft/data/loader.py), which
:func:`to_device` copies without blocking.
"""

from __future__ import annotations

import torch
from torch import nn

from . import loss as lossmod
from .attention import VARLEN_KEYS
from .models import Family
from .models.base import sum_tensors


def model_inputs(family: Family, model: nn.Module, batch: dict) -> dict:
    """What :class:`LossModule` needs of one micro-batch, on the host: the model's keyword
    arguments (``model``), the labels, sample ids and per-token rows the loss and the
    family's masks read, and ``rows``: the positions with a label (the only ones that go through
    the head; a superset of those with a non-zero weight, so exact)."""
    labels = batch["labels"]
    rows = (labels.reshape(-1) != lossmod.IGNORE_INDEX).nonzero().squeeze(1)
    return {"model": family.model_inputs(model, batch), "labels": labels,
            "sample_ids": batch["sample_ids"], "tokens": batch.get("tokens"), "rows": rows}


def to_device(obj, device, non_blocking: bool | None = None):
    """Tensors of a nested dict moved to ``device`` (None and numbers left as they are).
    ``non_blocking=None``: asynchronous exactly for pinned tensors (a pageable source would be
    copied synchronously anyway, and a pinned one stays alive in torch's host allocator until
    the copy is done)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=obj.is_pinned() if non_blocking is None else non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward(inputs, weights) -> S_mb, the weighted CE sum (not a mean).

    ``blank``: the family's vision inputs of one blank image (None with one process). With
    several ranks every rank must run the vision tower in every micro-batch, images or not:
    ZeRO-3 gathers its parameters with a collective when it runs, and ZeRO 1/2 reduce gradients
    in buckets that must be the same on every rank (a text-only rank measured a gloo size
    mismatch, 186144 vs 123456 elements). A micro-batch without images runs the blank image
    through ``get_image_features`` and adds 0 x its outputs to the language model's input
    embeddings: exactly zero, once per micro-batch, never a dummy image inside a sample.
    """

    def __init__(self, model: nn.Module, family: Family, chunk_size: int, blank: dict | None = None):
        super().__init__()
        self.model = model
        self.family = family
        self.chunk_size = chunk_size
        self.blank = blank

    def forward(self, inputs: dict, weights: torch.Tensor, n_chunks: int | None = None, groups: int = 0):
        """S_mb; with ``groups`` > 0, (S_mb, float64 [groups]: each group's part of S_mb), the
        groups read from ``inputs["groups"]`` (one index per token, e.g. its dataset)."""
        blank = []
        hidden = hidden_states(self.model, self.family, inputs, self.blank, blank)
        sums = torch.zeros(groups, dtype=torch.float64, device=hidden.device) if groups else None
        rows = inputs.get("rows")
        s = lossmod.weighted_ce_sum(hidden, self.model.get_output_embeddings(), inputs["labels"].to(hidden.device),
                                    weights.to(hidden.device), self.chunk_size, n_chunks=n_chunks,
                                    rows=None if rows is None else rows.to(hidden.device),
                                    groups=inputs.get("groups"), group_sums=sums)
        for feats in blank:
            total = sum_tensors(feats)
            if total is not None:
                s = s + 0.0 * total
        return (s, sums) if groups else s


def hidden_states(model: nn.Module, family: Family, inputs: dict, blank: dict | None = None,
                  blank_out: list | None = None) -> torch.Tensor:
    """Last hidden states [1, L, D] of a packed micro-batch (``inputs`` from :func:`model_inputs`,
    on the model's device). With ``blank`` and no image in the row, the blank image's vision
    outputs are appended to ``blank_out`` (see :class:`LossModule`). The varlen kernels'
    arguments go to the language tower alone: they describe its row, and a vision tower that
    passes its keyword arguments down (LLaVA's CLIP does) would split its own sequences by them."""
    base = model.model
    kw = dict(inputs["model"])
    varlen = {k: kw.pop(k) for k in VARLEN_KEYS if k in kw}
    dtype = next(model.parameters()).dtype
    if kw.get("pixel_values") is not None:
        kw["pixel_values"] = kw["pixel_values"].to(dtype)
    device = kw["input_ids"].device
    stub = torch.empty((*kw["input_ids"].shape, 0), dtype=dtype, device=device)
    mask = family.attention_mask(model, inputs, stub)
    hooks = []
    if varlen:
        hooks.append(getattr(base, family.language).register_forward_pre_hook(
            lambda _m, args, kwargs: (args, {**kwargs, **varlen}), with_kwargs=True))
    if kw.get("pixel_values") is None and blank is not None:
        vision = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in blank.items()}
        # Run the blank image exactly where images would run (before the language model), so
        # ZeRO-3 gathers parameters in the same order on every rank and every micro-batch.
        def run_blank(module, args, kwargs):
            feats = family.image_features(base, vision)
            total, embeds = sum_tensors(feats), kwargs.get("inputs_embeds")
            if total is None or embeds is None:
                blank_out.append(feats)  # added to the loss instead (LossModule)
                return None
            # 0 x the features enters where images' features enter, so the backward pass also
            # reaches the vision side after the language model, in the order real images make
            # (ZeRO-3 checks the backward's module order too: with a frozen language model, or
            # LoRA and a trained projector, adding it to the loss instead hung 2 ranks)
            kwargs["inputs_embeds"] = embeds + 0.0 * total.to(embeds.dtype)
            return args, kwargs

        hooks.append(getattr(base, family.language).register_forward_pre_hook(
            run_blank, prepend=True, with_kwargs=True))  # before ZeRO-3's own pre-hook records the language model
    try:
        return base(**kw, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
