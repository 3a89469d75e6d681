"""Reading a DeepSpeed engine's optimizer groups back (the tests compare them with lr-table)."""

from __future__ import annotations


def describe_groups(optimizer) -> list[dict]:
    """name, lr, lr_scale, weight_decay and numel of each param group of a torch optimizer or a
    DeepSpeed ZeRO one (``engine.optimizer``); compare with ``lr_table(...)["groups"]``.

    numel: ZeRO-1/2 groups hold this rank's flat fp32 partition, so it is counted from the
    original parameters (``bit16_groups``, one list per group). ZeRO-3 empties the groups
    between steps and regroups parameters into sub-groups: numel is None there."""
    groups = optimizer.param_groups
    originals = getattr(optimizer, "bit16_groups", None)
    if originals is None or len(originals) != len(groups):
        originals = [g["params"] for g in groups]
    out = []
    for g, params in zip(groups, originals):
        zero3 = not params or any(hasattr(p, "ds_numel") for p in params)
        out.append({"name": g.get("name"), "lr": g["lr"], "lr_scale": g.get("lr_scale"),
                    "weight_decay": g["weight_decay"],
                    "numel": None if zero3 else sum(p.numel() for p in params)})
    return out
