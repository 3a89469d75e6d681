"""Model FLOPs of a training step: the numerator of MFU (``mfu`` in metrics.jsonl).

One formula for every family, counted per micro-batch from what it holds and summed over the
rank's micro-batches (its MFU is its own FLOPs over its own step time and device peak):

**Matmuls.** The model's parameters are placed in towers by name (vlmft/optim.py ``place``),
in data-flow order vision -> projector -> language -> head. N_T = a tower's parameter elements
except embedding tables (``nn.Embedding`` weights: looked up, not multiplied), n_T = the tokens
it runs on:

- vision: patches, ``pixel_values`` elements / (channels x patch_size^2 x temporal_patch_size);
- projector: image tokens of the language rows (the projector's output tokens);
- language: every token of the rows;
- head: supervised tokens only (vlmft runs the head on those alone; loss.py), N = V x D.

Forward is 2 N_T n_T; backward adds 2 N_T^train n_T for the weight gradients (N^train: the
tower's trainable elements) and 2 N_T n_T for the gradients of its activations whenever a
trainable parameter lies in the tower or before it. So a trained tower costs 6N per token, a
frozen one after trained parts 4N (its activation gradients are still needed), a frozen one
with nothing trained before it 2N. (The first trained layer's own input gradient is counted
though not needed: an overcount of one layer at most.)

**Attention** (not in N), per layer with d = heads x head_dim, ``g`` = 3 when gradients flow
through the tower and 1 otherwise (backward is twice the forward):

- language: causal within each sample of a packed row (lengths L_i from the sample ids):
  g x 4 d x sum L_i (L_i + 1) / 2 (QK^T and AV over the query-key pairs a causal mask keeps);
- vision: bidirectional within each image sequence of S patches: g x 4 d_v x S^2 (S per image
  from ``image_grid_thw`` for Qwen-VL, else patches per image tile).

Not counted: the blank image a rank runs when it has none (it trains nothing), gradient
checkpointing's recomputation (hardware FLOPs, not model FLOPs), norms' and activations'
elementwise work. Sliding-window and windowed vision attention are counted as full attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loss import IGNORE_INDEX
from .optim import place

ORDER = ("vision", "projector", "language", "head")


def tower_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Tower -> (matmul parameter elements, of which trainable), see the module docstring."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {t: [0, 0] for t in ORDER}
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        tower, _ = place(name)
        if tower in (None, "head") or id(p) in tables:
            continue
        n = int(getattr(p, "ds_numel", p.numel()))
        out[tower][0] += n
        out[tower][1] += n if p.requires_grad else 0
    shape = getattr(head, "ds_shape", head.shape)
    n_head = int(math.prod(shape))
    out["head"] = [n_head, n_head if head.requires_grad else 0]
    return {t: (a, b) for t, (a, b) in out.items()}


def _attention_width(cfg) -> tuple[int, int]:
    """(layers, heads x head_dim) of a text or vision config."""
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "depth")
    width = getattr(cfg, "embed_dim", None) or cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads")
    head_dim = getattr(cfg, "head_dim", None) or width // heads
    return layers, heads * head_dim


def _patch_elems(vcfg) -> int:
    channels = getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_channels", None) or 3
    patch = vcfg.patch_size
    area = math.prod(patch) if isinstance(patch, (list, tuple)) else patch * patch
    return channels * area * (getattr(vcfg, "temporal_patch_size", None) or 1)


def vision_sequences(vision: dict | None, vcfg) -> list[int]:
    """Patches per image sequence the vision tower attends over (empty without images)."""
    pix = (vision or {}).get("pixel_values")
    if pix is None:
        return []
    grid = vision.get("image_grid_thw")
    if grid is not None:
        return [int(g.prod()) for g in grid]
    per_item = pix.shape[-3:].numel() // _patch_elems(vcfg)
    return [per_item] * math.prod(pix.shape[:-3])


def sample_lengths(sample_ids: torch.Tensor) -> list[int]:
    """Lengths of the samples of each packed row, from its sample ids."""
    out = []
    for row in sample_ids.reshape(-1, sample_ids.shape[-1]):
        _, counts = torch.unique_consecutive(row, return_counts=True)
        out += counts.tolist()
    return out


def model_flops(model: nn.Module, batches: list[dict]) -> float:
    """FLOPs (forward + backward) of one optimizer step over these micro-batches."""
    params = tower_params(model)
    flows, seen = {}, False
    for t in ORDER:   # gradients flow through a tower when it or an earlier one trains
        seen = seen or params[t][1] > 0
        flows[t] = seen
    text, vcfg = model.config.get_text_config(), model.config.vision_config
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    t_layers, t_width = _attention_width(text)
    v_layers, v_width = _attention_width(vcfg)
    total = 0.0
    for b in batches:
        seqs = vision_sequences(b.get("vision"), vcfg)
        tokens = {"vision": sum(seqs), "projector": int((b["input_ids"] == image_id).sum()) if seqs else 0,
                  "language": b["input_ids"].numel(), "head": int((b["labels"] != IGNORE_INDEX).sum())}
        for t in ORDER:
            n, n_train = params[t]
            total += 2.0 * tokens[t] * (n + n_train + (n if flows[t] else 0))
        pairs = sum(x * (x + 1) // 2 for x in sample_lengths(b["sample_ids"]))
        total += (3 if flows["language"] else 1) * 4.0 * t_width * t_layers * pairs
        total += (3 if flows["vision"] else 1) * 4.0 * v_width * v_layers * sum(s * s for s in seqs)
    return total
