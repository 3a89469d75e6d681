"""Deliberate bugs (mutants) that the fast tests must catch. ``VLMFT_MUTANT=NAME pytest ...``
applies one for the whole session (tests/conftest.py); tests/test_mutants.py runs the fast tests
under each and asserts that they fail.

- ``no_label_shift``: the row's labels are not shifted (the model would learn to copy its input).
- ``sample_square_swap``: ``sample`` weighs a token by 1/sqrt(n) and ``square`` by 1/n.
- ``no_position_restart``: position ids run on over the whole packed row.
- ``bias_decay``: biases get weight decay.
- ``eval_token_reduction``: the eval loss weighs every token alike whatever loss.reduction says.
- ``adaptive_unweighted``: the adaptive weights are computed and logged but never put on the rows.
- ``lora_tower_leak``: a lora.targets glob selects modules of every tower, not only its own.
- ``lora_unscaled_merge``: the merged export adds B A without the alpha / r scaling.
- ``lora_trains_base``: under LoRA, weights that are neither adapters nor saved modules train.
"""

from __future__ import annotations

MUTANTS = ("no_label_shift", "sample_square_swap", "no_position_restart", "bias_decay",
           "eval_token_reduction", "adaptive_unweighted", "lora_tower_leak", "lora_unscaled_merge",
           "lora_trains_base")


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


def _lora_tower_leak():
    from vlmft import lora

    targets = lora._glob_targets

    def leaky(glob, tower, key, modules, towers, errors):
        return targets(glob, tower, key, modules, dict.fromkeys(towers, tower), errors)

    lora._glob_targets = leaky


def _lora_unscaled_merge():
    from peft.tuners.lora import LoraLayer

    from vlmft import export

    merged = export.merged_state

    def unscaled(model, state):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        saved = [dict(m.scaling) for m in layers]
        for m in layers:
            m.scaling = dict.fromkeys(m.scaling, 1.0)
        try:
            return merged(model, state)
        finally:
            for m, s in zip(layers, saved):
                m.scaling = s

    export.merged_state = unscaled


def _lora_trains_base():
    from vlmft import optim

    rule = optim._lora_rule

    def leaky(frozen_by, errors):
        inner = rule(frozen_by, errors)
        return lambda tower, lid, tied, name: (frozen_by(tower, lid, tied, name) if optim.kind(name) == "other"
                                               else inner(tower, lid, tied, name))

    optim._lora_rule = leaky
