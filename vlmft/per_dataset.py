"""Per-dataset figures of a packed micro-batch: the dataset of each token, the adaptive weights
put on the rows' loss weights, and the per-dataset training loss of a step.

A micro-batch row (vlmft/data/stream.py) carries ``sample_ids`` (its samples numbered 0..k-1
per token) and ``sample_dataset`` (the dataset of sample k), so a token's dataset is
``sample_dataset[sample_ids]``.

Per-dataset training loss (``train/<name>/loss`` in metrics.jsonl): the step's loss restricted to
dataset i, sum_{t in i} c_t l_t / sum_{t in i} c_t over every rank and micro-batch of the step,
with the step's own c_t (vlmft/loss.py); the overall loss is their W-weighted mean.
"""

from __future__ import annotations

import torch


def token_datasets(batch: dict) -> torch.Tensor:
    """[1, L] the dataset index of each token (-1 on padding and on an all-bad row's pad)."""
    sid = batch["sample_ids"]
    ds = batch["sample_dataset"][sid.clamp(min=0)]
    return torch.where(sid >= 0, ds, torch.full_like(ds, -1))


def weigh(batches: list[dict], d: list[float]) -> None:
    """Set each token's loss weight to d[its dataset] (d_i = loss_weight_i x adaptive w_i,
    vlmft/data/adaptive.py ``apply``); tokens of no dataset keep theirs (0)."""
    dv = torch.tensor(d, dtype=torch.float32)
    for b in batches:
        ds = token_datasets(b)
        keep = ds >= 0
        lw = b["loss_weight"].clone()
        lw[keep] = dv[ds[keep]]
        b["loss_weight"] = lw


def weight_sums(weights: list[torch.Tensor], batches: list[dict], n: int) -> torch.Tensor:
    """float64 [n]: this rank's sum of c_t per dataset over the step's micro-batches."""
    out = torch.zeros(n, dtype=torch.float64)
    for w, b in zip(weights, batches):
        ds = token_datasets(b)
        keep = ds >= 0
        out.index_add_(0, ds[keep], w[keep].double())
    return out


def train_losses(sums: list[float], weights: list[float], names: list[str]) -> dict:
    """{'train/<name>/loss': S_i / W_i} (None for a dataset with nothing supervised in the step)."""
    return {f"train/{n}/loss": (s / w if w > 0 else None) for n, s, w in zip(names, sums, weights)}
