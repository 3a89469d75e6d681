"""Per-token loss weights, the chunked fp32 cross-entropy and the step's global normalizer.

Objective of one optimizer step
-------------------------------
B = the packs of the step over all ranks and all accumulation micro-batches, s a sample, t one
of its supervised tokens, l_t the token's cross-entropy, d(s) the loss_weight of its dataset and
n_s the supervised tokens of the whole sample::

    L = sum_{s in B} d(s) w(n_s) sum_{t in s} l_t  /  sum_{s in B} d(s) w(n_s) n_s

    w(n) = 1 ("token"), 1/n ("sample"), 1/sqrt(n) ("square")

With c_t = d(s) w(n_s) the weight of token t (:func:`token_weights`), L = sum_t c_t l_t / W with
W = sum_t c_t over the whole step. "token" is the mean over tokens, "sample" the (d-weighted)
mean of per-sample means, "square" lies between the two.

Scaling in the train step (the algebra)
---------------------------------------
Rank r runs micro-batches m = 1..M_r (M_r may differ between ranks). Let
S_m = sum_{t in m} c_t l_t (:func:`weighted_ce_sum`, run by vlmft/forward.py's LossModule) and
W_global = the sum of c_t over every rank's micro-batches (vlmft/train.py's ``step_counts`` sums
them on each rank; ``vlmft.distributed.all_reduce_sum`` adds the ranks' sums in the step's one
all-reduce before the first backward). Then L = sum_r sum_m S_m / W_global.

DeepSpeed does two things to what ``engine.backward(x)`` receives:

1. it divides x by gradient_accumulation_steps, unless ``scale_wrt_gas=False``;
2. it averages the gradients over the data-parallel world of size P (ZeRO 1/2/3):
   the gradient it steps with is (1/P) sum_r sum_m grad x_{r,m}.

So each micro-batch calls ``engine.backward(S_m / W_global * P, scale_wrt_gas=False)``
(:func:`scaled_loss`), and the gradient DeepSpeed steps with is
(1/P) sum_r sum_m P grad S_m / W_global = grad (sum_{r,m} S_m / W_global) = grad L, exactly,
whatever the number of micro-batches or tokens on each rank (W_global is a constant: it
depends on labels only). Measured: <= 2e-8 relative against the single-process gradient with 2
ranks x 2 accumulation steps; tests/test_distributed_grad.py holds it to 1e-5 on ZeRO 1, 2, 3.

The logged loss is the all-reduced ``sum_m S_m.detach()`` over ``W_global``: L itself.

Empty steps: if W_global is 0 (no supervised token in the whole step, or every dataset in it
has loss_weight 0) L is undefined; :func:`step_is_empty` says so, the step is skipped (no
backward, no optimizer step) and counted - never NaN. Every rank sees the same W_global, so
every rank takes the same decision.

ZeRO-3 note: :func:`weighted_ce_sum` calls ``lm_head`` once per chunk (again in backward, for
the recomputation). ZeRO-3 gathers the head's weight at every call with a collective, so all
ranks must make the same number of calls, and DeepSpeed's trace of module calls must be the
same in every micro-batch (else it is invalidated: no prefetch, and the head re-gathered for
every chunk): vlmft/train.py passes one ``n_chunks`` for the whole run, :func:`chunks_needed`
of a full row (micro_batch_size x max_packed_tokens); chunks beyond the tokens are empty calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("token", "sample", "square")
IGNORE_INDEX = -100


def token_weights(labels: Tensor, sample_ids: Tensor, loss_weight: Tensor | None,
                  reduction: str) -> Tensor:
    """c_t = d(s) w(n_s) on supervised tokens, 0 elsewhere, float32 of the shape of ``labels``.

    ``labels`` [B, L] are already shifted (-100 where unsupervised), ``sample_ids`` [B, L]
    number the samples of each row 0..k-1 (-1 on padding), ``loss_weight`` [B, L] is d(s) per
    token (None: 1). n_s counts the supervised tokens of each (row, sample id); vectorized.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if labels.shape != sample_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and sample_ids "
                         f"{tuple(sample_ids.shape)} differ in shape")
    shape = labels.shape
    if labels.dim() == 0 or labels.numel() == 0:
        return torch.zeros(shape, dtype=torch.float32, device=labels.device)
    length = shape[-1]
    labels2 = labels.reshape(-1, length)
    sids = sample_ids.reshape(-1, length).long()
    sup = (labels2 != IGNORE_INDEX) & (sids >= 0)
    if reduction == "token":
        w = sup.to(torch.float32)
    else:
        # One counter per (row, sample id); a sample id is < L since every sample has a token.
        rows = torch.arange(sids.shape[0], device=sids.device).unsqueeze(1)
        key = (rows * length + sids.clamp(min=0)).reshape(-1)
        counts = torch.zeros(sids.numel(), dtype=torch.float32, device=sids.device)
        counts.index_add_(0, key, sup.reshape(-1).to(torch.float32))
        n = counts[key].reshape(sids.shape).clamp(min=1.0)
        w = n.reciprocal() if reduction == "sample" else n.rsqrt()
        w = torch.where(sup, w, torch.zeros_like(w))
    if loss_weight is not None:
        w = w * loss_weight.reshape(-1, length).to(torch.float32)
    return w.reshape(shape)


def step_is_empty(w_global: Tensor | float) -> bool:
    """True when the step has nothing to learn from (W_global == 0): skip it and count it.

    Also true for a NaN or negative W_global, which cannot come from valid weights.
    """
    w = float(w_global)
    return not (w > 0.0 and math.isfinite(w))


def scaled_loss(s_mb: Tensor, w_global: Tensor | float, world_size: int) -> Tensor:
    """What a micro-batch passes to ``engine.backward(..., scale_wrt_gas=False)``:
    S_mb / W_global * world_size (see the module docstring for why)."""
    if isinstance(w_global, Tensor):
        w_global = w_global.to(device=s_mb.device, dtype=s_mb.dtype)
    return s_mb / w_global * world_size


def chunks_needed(n_supervised: int, chunk_size: int) -> int:
    """lm_head calls :func:`weighted_ce_sum` makes for ``n_supervised`` tokens (at least 1)."""
    return max(1, -(-int(n_supervised) // int(chunk_size)))


def _chunk_ce(lm_head: nn.Module, h: Tensor, labels: Tensor, w: Tensor) -> Tensor:
    """The chunk's weighted per-token cross-entropy c_t l_t (summed by the caller)."""
    logits = lm_head(h).float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce * w


def weighted_ce_sum(hidden: Tensor, lm_head: nn.Module, labels: Tensor, weights: Tensor,
                    chunk_size: int, n_chunks: int | None = None, rows: Tensor | None = None,
                    groups: Tensor | None = None, group_sums: Tensor | None = None) -> Tensor:
    """sum_t weights_t * CE(fp32(lm_head(hidden_t)), labels_t), a 0-d float32 tensor.

    ``hidden`` [..., D], ``labels`` and ``weights`` [...] (flattened here). Only positions with a
    non-zero weight and a label go through the head, ``chunk_size`` at a time; each chunk is
    checkpointed, so neither the forward nor the graph ever holds more than one chunk of fp32
    logits (backward recomputes the chunk's logits). Without any such position the head is still
    called once on zero rows, so the graph reaches it (zero gradient) on every rank.
    ``n_chunks`` forces that many head calls (ZeRO-3, see the module docstring). ``rows``: the
    flattened positions to run through the head, found on the host beforehand (any superset of
    the positions with a weight and a label is exact); None finds them here (a device sync).
    ``groups`` (a group index per position, e.g. its dataset) with ``group_sums`` (a 1-D tensor,
    float64 for exact sums): each group's sum of c_t l_t is added into ``group_sums[g]``
    (detached; positions outside 0..len-1 are left out).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    weights = weights.reshape(-1).to(torch.float32)
    if not (h.shape[0] == labels.shape[0] == weights.shape[0]):
        raise ValueError(f"hidden has {h.shape[0]} positions, labels {labels.shape[0]}, "
                         f"weights {weights.shape[0]}")
    idx = ((weights != 0) & (labels != IGNORE_INDEX)).nonzero().squeeze(1) if rows is None else rows
    h, labels, weights = h.index_select(0, idx), labels.index_select(0, idx), weights.index_select(0, idx)
    if group_sums is not None:   # no boolean indexing below: no device sync per chunk
        g = groups.reshape(-1).to(idx.device).index_select(0, idx)
        keep = ((g >= 0) & (g < group_sums.shape[0])).to(group_sums.dtype)
        g = torch.where(keep > 0, g, torch.zeros_like(g))
    n = h.shape[0]
    needed = chunks_needed(n, chunk_size)
    if n_chunks is None:
        n_chunks = needed
    elif n_chunks < needed:
        raise ValueError(f"n_chunks={n_chunks} < {needed} chunks needed for {n} tokens")
    use_ckpt = torch.is_grad_enabled() and (h.requires_grad or any(
        p.requires_grad for p in lm_head.parameters()))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(n_chunks):
        sl = slice(i * chunk_size, (i + 1) * chunk_size)  # empty past the end
        args = (lm_head, h[sl], labels[sl], weights[sl])
        if use_ckpt:
            part = checkpoint(_chunk_ce, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_ce(*args)
        total = total + part.sum()
        if group_sums is not None:
            group_sums.index_add_(0, g[sl], part.detach().to(group_sums.dtype) * keep[sl])
    return total
