"""What may change between a checkpoint and the run that resumes it.

A resumed run is exact when it sees the same data in the same order and computes the same
updates. Keys that cannot affect that (where to log, how often to save, how many workers build
batches) change freely, and so does the split of the global batch into ranks, micro-batches and
accumulation (the plan and the loss do not depend on it); ``train.max_steps`` changes with a
warning (the LR schedule stretches).
Everything else, a different global batch (micro_batch_size x grad_accum_steps x world size),
and another world size under ZeRO-3 (not exact through DeepSpeed's conversion) are refused
unless ``--force``.
"""

from __future__ import annotations

FREE = ("output_dir", "checkpoint.", "log.", "data.num_workers")
# how the global batch is split: free as long as the global batch stays (checked below)
SPLIT = ("train.micro_batch_size", "train.grad_accum_steps")
WARN = ("train.max_steps",)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compare(saved: dict, current: dict, saved_world: int, world: int,
            defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """(warnings, refusals) for resuming a run saved with ``saved`` onto ``current``.
    ``defaults`` (the schema's defaults, as nested dicts): a key the saved recipe lacks, because
    it was added to vlmft after the checkpoint was written, held its default there."""
    a, b = flatten(saved), flatten(current)
    a = {**{k: v for k, v in flatten(defaults or {}).items() if k in b}, **a}
    warnings, refusals = [], []
    # train.epochs runs were saved with the steps it came to (vlmft/data/epochs.py); the resumed
    # run computes them again from the same data (the plan state refuses changed data)
    derived = ("train.epochs", "train.max_steps") if current["train"].get("epochs") else ()
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old == new or key.startswith(FREE) or key in SPLIT or key in derived:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (warnings if key.startswith(WARN) else refusals).append(line)
    t0, t1 = saved["train"], current["train"]
    g0 = t0["micro_batch_size"] * t0["grad_accum_steps"] * saved_world
    g1 = t1["micro_batch_size"] * t1["grad_accum_steps"] * world
    if g0 != g1:
        refusals.append(f"global batch: {g0} packs a step ({saved_world} ranks) -> {g1} ({world} ranks); "
                        "keep micro_batch_size x grad_accum_steps x world size equal")
    elif saved_world != world and current["engine"]["zero_stage"] == 3:
        # DeepSpeed's universal conversion loses ZeRO-3 optimizer state: 2 ranks x 2 -> 1 rank x 4
        # matched the first resumed loss, then differed by 0.007 and 0.02 (measured 2026-11-30)
        refusals.append(f"world size {saved_world} -> {world} under ZeRO-3: DeepSpeed's conversion does "
                        f"not bring the optimizer state back exactly; resume on {saved_world} ranks")
    elif (saved_world, t0["micro_batch_size"], t0["grad_accum_steps"]) != (world, t1["micro_batch_size"], t1["grad_accum_steps"]):
        warnings.append(f"global batch of {g1} packs now split as {world} ranks x "
                        f"{t1['micro_batch_size']} x {t1['grad_accum_steps']} (was {saved_world} x "
                        f"{t0['micro_batch_size']} x {t0['grad_accum_steps']})")
    return warnings, refusals
