"""vlmft/resume.py: which recipe changes a resume accepts, on the resolved recipes as train.py
saves and compares them."""

from __future__ import annotations

from vlmft.recipe import Recipe, load, to_dict
from vlmft.resume import compare

from .conftest import DEMO


def _saved_without(key: str) -> dict:
    """The demo's resolved recipe as a checkpoint written before ``key`` existed holds it."""
    d = to_dict(load(DEMO, ["output_dir=x"]))
    section, name = key.split(".")
    del d[section][name]
    return d


def test_a_key_added_after_the_checkpoint_counts_as_its_default():
    saved = _saved_without("train.max_nonfinite_steps")
    same = to_dict(load(DEMO, ["output_dir=x"]))
    assert compare(saved, same, 1, 1, defaults=to_dict(Recipe())) == ([], [])
    changed = to_dict(load(DEMO, ["output_dir=x", "train.max_nonfinite_steps=7"]))
    warnings, refusals = compare(saved, changed, 1, 1, defaults=to_dict(Recipe()))
    assert [r.split(":")[0] for r in refusals] == ["train.max_nonfinite_steps"]
    # without the schema's defaults such a key would always look changed
    assert compare(saved, same, 1, 1)[1]


def test_free_keys_split_and_global_batch():
    saved = to_dict(load(DEMO, ["output_dir=x"]))
    g = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum_steps"]
    free = to_dict(load(DEMO, ["output_dir=y", "log.every_steps=5", "checkpoint.every_steps=9"]))
    assert compare(saved, free, 1, 1) == ([], [])
    split = to_dict(load(DEMO, ["output_dir=x", f"train.grad_accum_steps={g}", "train.micro_batch_size=1"]))
    warnings, refusals = compare(saved, split, 1, 1)
    assert refusals == [] and (warnings != []) == (saved["train"]["micro_batch_size"] != 1)
    warnings, refusals = compare(saved, saved, 1, 2)
    assert len(refusals) == 1 and refusals[0].startswith("global batch")
    lr = to_dict(load(DEMO, ["output_dir=x", "optim.lr=0.5"]))
    assert [r.split(":")[0] for r in compare(saved, lr, 1, 1)[1]] == ["optim.lr"]


def test_zero3_onto_another_world_size_is_refused_zero2_is_not():
    for stage, refused in ((2, False), (3, True)):
        saved = to_dict(load(DEMO, ["output_dir=x", f"engine.zero_stage={stage}", "train.grad_accum_steps=2"]))
        now = to_dict(load(DEMO, ["output_dir=x", f"engine.zero_stage={stage}", "train.grad_accum_steps=4"]))
        warnings, refusals = compare(saved, now, 2, 1)
        assert bool(refusals) == refused and bool(warnings) != refused, (stage, warnings, refusals)
        if refused:
            assert refusals[0].startswith("world size 2 -> 1 under ZeRO-3")
