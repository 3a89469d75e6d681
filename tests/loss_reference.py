"""Loss helpers the tests build references with (not on vlmft's production path, which computes
the weights once per step in vlmft/train.py's step_counts and the weighted sum in
vlmft/forward.py's LossModule)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmft.loss import IGNORE_INDEX, token_weights, weighted_ce_sum


def local_weight_sum(micro_batches: Iterable[Mapping[str, Tensor]], reduction: str) -> Tensor:
    """Sum of token_weights over micro-batches (0-d float32, summed in float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        w = token_weights(mb["labels"], mb["sample_ids"], mb.get("loss_weight"), reduction)
        total = total + w.sum(dtype=torch.float64).cpu()
    return total.to(torch.float32)


def weighted_ce_sum_from_logits(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """The plain reference: sum_t weights_t * CE(fp32 logits_t, labels_t), full logits at once."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    weights = weights.reshape(-1).to(torch.float32)
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    return (ce * weights).sum()


def micro_batch_sum(hidden: Tensor, lm_head: nn.Module, batch: Mapping[str, Tensor],
                    reduction: str, chunk_size: int, n_chunks: int | None = None) -> Tensor:
    """S_mb of one micro-batch: the weighted CE sum from its last hidden states [B, L, D]."""
    w = token_weights(batch["labels"], batch["sample_ids"], batch.get("loss_weight"), reduction)
    return weighted_ce_sum(hidden, lm_head, batch["labels"].to(hidden.device), w.to(hidden.device),
                           chunk_size, n_chunks=n_chunks)
