"""Deliberate bugs (mutants) that the fast tests must catch. ``VLMFT_MUTANT=NAME pytest ...``
applies one for the whole session (tests/conftest.py); tests/test_mutants.py runs the fast tests
under each and asserts that they fail.

- ``no_label_shift``: the row's labels are not shifted (the model would learn to copy its input).
- ``sample_square_swap``: ``sample`` weighs a token by 1/sqrt(n) and ``square`` by 1/n.
- ``no_position_restart``: position ids run on over the whole packed row.
- ``bias_decay``: biases get weight decay.
- ``eval_token_reduction``: the eval loss weighs every token alike whatever loss.reduction says.
- ``adaptive_unweighted``: the adaptive weights are computed and logged but never put on the rows.
"""

from __future__ import annotations

MUTANTS = ("no_label_shift", "sample_square_swap", "no_position_restart", "bias_decay",
           "eval_token_reduction", "adaptive_unweighted")


def apply(name: str) -> None:
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; one of {MUTANTS}")
    globals()[f"_{name}"]()


def _no_label_shift():
    import torch

    from vlmft.data import stream

    row = stream.row

    def unshifted(encs, loss_weights, family):
        out = row(encs, loss_weights, family)
        out["labels"] = torch.tensor([x for e in encs for x in e.labels], dtype=torch.long)[None]
        return out

    stream.row = unshifted


def _sample_square_swap():
    from vlmft import loss

    weights = loss.token_weights

    def swapped(labels, sample_ids, loss_weight, reduction):
        other = {"sample": "square", "square": "sample"}.get(reduction, reduction)
        return weights(labels, sample_ids, loss_weight, other)

    loss.token_weights = swapped


def _no_position_restart():
    import numpy as np

    from vlmft.data import packing

    layout = packing.layout

    def running(lengths):
        pos, sid, cu = layout(lengths)
        return np.arange(len(pos), dtype=pos.dtype), sid, cu

    packing.layout = running


def _bias_decay():
    from vlmft import optim

    reason = optim._no_decay_reason

    def decayed(name, p, *args):
        return None if name.endswith(".bias") else reason(name, p, *args)

    optim._no_decay_reason = decayed


def _eval_token_reduction():
    from vlmft import eval_loss

    weights = eval_loss.token_weights

    def token_only(labels, sample_ids, loss_weight, reduction):
        return weights(labels, sample_ids, loss_weight, "token")

    eval_loss.token_weights = token_only


def _adaptive_unweighted():
    from vlmft import per_dataset

    per_dataset.weigh = lambda batches, d: None
