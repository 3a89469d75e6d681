"""Held-out loss per eval dataset, normalized exactly like training, and the same loss with
blank images (visual reliance).

For eval dataset d, with c_t = w(n_s) the training reduction's weight of supervised token t
(vlmft/loss.py ``token_weights``; the datasets' loss_weight plays no part, it is the same
within a dataset) and l_t its cross-entropy::

    loss_d = sum_{t in d} c_t l_t / sum_{t in d} c_t        over the whole eval set, all ranks
    loss   = sum_t c_t l_t / sum_t c_t                       over every eval dataset

Each rank runs its micro-batches (vlmft/eval_data.py deals them) through the training forward
(forward.LossModule, which returns each dataset's part of sum c_t l_t in float64); the sums
S_d, W_d (and the blank-image S'_d) are added over ranks in one all-reduce, so the figure does
not depend on the number of ranks (measured identical to 1e-6 on 1 and 2 ranks). ZeRO-3: every
rank makes the same number of forward and lm_head calls (a rank with fewer micro-batches runs a
one-token row of weight 0); eval_data.EvalData.agreed computes them without a collective.

``loss_blank_images`` is the same loss with every image's pixels replaced by a blank image of
its size (tokens and positions unchanged; text-only samples are the same in both), and
``visual_gap = loss_blank_images - loss``: clearly positive when the model reads the images,
about 0 when it answers from the text alone.
"""

from __future__ import annotations

import torch

from .data.stream import Materializer
from .distributed import all_reduce_sum
from .eval_data import EvalData, rows
from .forward import model_inputs, to_device
from .loss import token_weights
from .per_dataset import token_datasets


def loss_sums(module, data: EvalData, mat: Materializer, rank: int, world: int, micro_batch: int,
              reduction: str, chunk_size: int, blank: bool, device=None) -> torch.Tensor:
    """float64 [5, G], summed over ranks: rows S_d, W_d, S_d with blank images, samples, bad
    samples per eval dataset d. ``module`` is a forward.LossModule or the DeepSpeed engine
    wrapping one (called in no-grad mode)."""
    G = len(data.names)
    acc = torch.zeros(5, G, dtype=torch.float64)
    chunks, has_images = data.agreed(world, micro_batch, chunk_size)
    mine = data.rank_packs(rank, world, micro_batch)
    inner = getattr(module, "module", module)   # the LossModule inside an engine
    for i, n_chunks in enumerate(chunks):
        batch, blank_batch, bad = rows(mat, mine[i] if i < len(mine) else [], blank and has_images[i])
        w = token_weights(batch["labels"], batch["sample_ids"], None, reduction)
        groups = token_datasets(batch)
        s = _forward(module, inner, batch, w, groups, n_chunks, G, device)
        acc[0] += s
        acc[2] += _forward(module, inner, blank_batch, w, groups, n_chunks, G, device) if blank_batch else s
        keep = groups >= 0
        acc[1].index_add_(0, groups[keep], w[keep].double())
        sid = batch["sample_dataset"]
        acc[3].index_add_(0, sid[sid >= 0], torch.ones(int((sid >= 0).sum()), dtype=torch.float64))
        acc[4] += torch.tensor(bad, dtype=torch.float64)
    return all_reduce_sum(acc.to(device) if device is not None else acc).cpu()


def _forward(module, inner, batch: dict, w, groups, n_chunks: int, G: int, device) -> torch.Tensor:
    inputs = model_inputs(inner.family, inner.model, batch)
    inputs["groups"] = groups
    inputs = to_device(inputs, device) if device is not None else inputs
    with torch.no_grad():
        _, sums = module(inputs, w.to(device) if device is not None else w, n_chunks=n_chunks, groups=G)
    return sums.cpu()


def figures(acc: torch.Tensor, names: list[str], blank: bool) -> tuple[dict, dict]:
    """({name: {samples, bad_samples, loss, loss_blank_images, visual_gap}}, the same over
    every eval dataset) from :func:`loss_sums`' sums."""
    def one(S, W, Sb, n, bad):
        loss = S / W if W > 0 else None
        row = {"samples": int(n), "bad_samples": int(bad), "loss": loss}
        if blank:
            lb = Sb / W if W > 0 else None
            row.update(loss_blank_images=lb, visual_gap=None if loss is None else lb - loss)
        return row

    per = {n: one(*acc[:, d].tolist()) for d, n in enumerate(names)}
    return per, one(*acc.sum(dim=1).tolist())
