"""InternVL's packing knobs: min_active_tokens_ratio is a sample filter under every strategy;
allow_overflow acts under internvl only and strict_mode is refused; the balance options'
combinations are checked by the recipe."""

from __future__ import annotations

import numpy as np
import pytest

from vlmft.data.catalog import REASONS, build_catalog
from vlmft.data.stream import PackPlan
from vlmft.recipe import RecipeError, load

from .conftest import DEMO


@pytest.fixture(scope="module")
def demo_catalog(processor):
    import os

    from .conftest import ROOT

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return build_catalog(load(DEMO), processor)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("strategy", ["best_fit", "internvl", "next_fit", "none"])
def test_min_active_tokens_ratio_drops_and_counts_samples_under_every_strategy(
        strategy, demo_catalog, processor, in_root):
    full = demo_catalog
    frac = np.array([s.n_supervised / s.length for s in full.samples])
    ratio = float(np.round(np.median(frac), 4))                # about half the samples go
    dropped = {s.record for s, f in zip(full.samples, frac) if f < ratio}    # by hand
    assert 0 < len(dropped) < len(full.samples)
    over = [f"data.packing.min_active_tokens_ratio={ratio}"]
    over += ["data.packing.enabled=false"] if strategy == "none" else [f"data.packing.strategy={strategy}"]
    r = load(DEMO, over)
    cat = build_catalog(r, processor)
    assert cat.dropped["low_supervised_ratio"] == len(dropped)
    assert sum(cat.dropped.values()) == sum(full.dropped.values()) + len(dropped)
    kept = {s.record for s in full.samples} - dropped
    assert {s.record for s in cat.samples} == kept
    packs = PackPlan(r, cat, global_batch=2).round(0).packs
    assert sorted(cat.samples[i].record for p in packs for i in p) == sorted(kept)   # an epoch
    assert "min_active_tokens_ratio" in REASONS["low_supervised_ratio"]
    assert any("min_active_tokens_ratio=" in x for x in cat.examples["low_supervised_ratio"])


def test_min_active_tokens_ratio_zero_keeps_every_sample(demo_catalog, processor, in_root):
    cat = build_catalog(load(DEMO, ["data.packing.min_active_tokens_ratio=0.0"]), processor)
    assert len(cat.samples) == len(demo_catalog.samples) and "low_supervised_ratio" not in cat.dropped


@pytest.mark.parametrize("override, message", [
    (["data.packing.strict_mode=true", "data.packing.strategy=internvl", "data.packing.num_images_expected=8"],
     "data.packing.strict_mode: not supported"),
    (["data.packing.allow_overflow=true"], "data.packing.allow_overflow: only used with data.packing.strategy=internvl"),
    (["data.packing.allow_overflow=true", "data.packing.strategy=next_fit"],
     "data.packing.allow_overflow: only used with data.packing.strategy=internvl (strategy is next_fit)"),
    (["data.packing.balance_compute=true", "data.packing.strategy=internvl"],
     "data.packing.balance_compute: needs data.packing.strategy=best_fit"),
    (["data.packing.balance_compute=true", "data.step_balance=modality"],
     "data.packing.balance_compute: not combined with data.step_balance"),
    (["data.step_balance=tasks"], "data.step_balance: 'tasks' is not one of none, dataset, modality"),
])
def test_knobs_that_would_do_nothing_are_refused_with_one_line(override, message, in_root):
    with pytest.raises(RecipeError) as e:
        load(DEMO, override)
    assert len(e.value.errors) == 1 and message in e.value.errors[0], e.value.errors


def test_accepted_combinations_load(in_root):
    r = load(DEMO, ["data.packing.allow_overflow=true", "data.packing.strategy=internvl"])
    assert r.data.packing.allow_overflow
    r = load(DEMO, ["data.packing.balance_compute=true", "data.step_balance=none"])
    assert r.data.packing.balance_compute
    assert load(DEMO, ["data.step_balance=dataset"]).data.step_balance == "dataset"
