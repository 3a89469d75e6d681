"""Dataset mixtures: size x repeat_time (InternVL) and temperature, with a linear tau schedule."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vlmft.data.mixture import Mixture, quotas, temperature_at, weights
from vlmft.data.stream import PackPlan
from vlmft.recipe import RecipeError, load

from .test_stream import recipe, synthetic_catalog

SIZES = (60_000, 25_000, 4_000, 600)


def shares(cat, packs) -> np.ndarray:
    c = Counter(cat.samples[i].dataset for p in packs for i in p)
    n = sum(c.values())
    return np.array([c[d] / n for d in range(len(cat.datasets))])


def test_weights_and_quotas():
    n = np.array(SIZES)
    assert np.allclose(weights(n, "size"), n / n.sum())
    assert np.allclose(weights(n, "temperature", 1.0), n / n.sum())
    assert np.allclose(weights(n, "temperature", 2.0), np.sqrt(n) / np.sqrt(n).sum())
    assert np.allclose(weights(n, "temperature", 1e6), 0.25, atol=1e-4)       # flat
    assert weights([5, 0, 5], "temperature", 3.0)[1] == 0                      # empty set: none
    for total in (1, 7, 10_000, 123_457):
        q = quotas(weights(n, "temperature", 2.0), total)
        assert q.sum() == total and np.all(np.abs(q - total * weights(n, "temperature", 2.0)) < 1)
    assert temperature_at(0.5, 3.0, 1.0, "linear") == 2.0
    assert temperature_at(7.0, 3.0, 1.0, "linear") == 1.0                     # clamped after the end
    assert temperature_at(0.5, 3.0, 1.0, "constant") == 3.0


def test_size_mixture_is_an_epoch_per_round_reshuffled():
    cat = synthetic_catalog(sizes=(3000, 1000, 200))
    plan = PackPlan(recipe(), cat)
    r0, r1 = plan.round(0), plan.round(1)
    for r in (r0, r1):
        assert sorted(i for p in r.packs for i in p) == list(range(len(cat.samples)))
    assert r0.packs != r1.packs                                   # epoch 1 reshuffled
    assert PackPlan(recipe(), cat).round(1).packs == r1.packs     # ... by (seed, epoch) alone


def test_temperature_shares_are_within_1pct_of_the_target_over_100k_samples():
    cat = synthetic_catalog(sizes=SIZES, tiles=False)
    plan = PackPlan(recipe(mixture="temperature", temperature=2.0, round_size=10_000), cat)
    packs = [p for c in range(10) for p in plan.round(c).packs]
    assert sum(len(p) for p in packs) == 100_000
    target = weights(SIZES, "temperature", 2.0)
    got = shares(cat, packs)
    assert np.all(np.abs(got - target) <= 0.01 * target), (got, target)
    assert got[-1] > 7 * SIZES[-1] / sum(SIZES)                    # the small set: 7.4x upsampled
    # an upsampled set is read in passes: every sample of it taken 8 or 9 times, never 7 and 10
    small = Counter(i for p in packs for i in p if cat.samples[i].dataset == 3)
    assert len(small) == 600 and max(small.values()) - min(small.values()) <= 1


def test_a_linear_tau_schedule_moves_the_shares_as_specified():
    cat = synthetic_catalog(sizes=SIZES, tiles=False)
    steps = 4000
    plan = PackPlan(recipe((1, 4), max_steps=steps, mixture="temperature", temperature=3.0,
                           temperature_schedule="linear", temperature_end=1.0,
                           round_size=10_000), cat)
    plan.step(0, 1)                                               # G = 4
    taus, small = [], []
    c = 0
    while True:
        r = plan.round(c)
        progress = r.start / (steps * 4)
        assert r.tau == pytest.approx(max(1.0, 3.0 - 2.0 * progress))
        target = weights(SIZES, "temperature", r.tau)
        got = shares(cat, r.packs)
        assert np.all(np.abs(got - target) <= 0.01 * target + 1e-4), (c, got, target)
        taus.append(r.tau)
        small.append(got[-1])
        if progress > 1:
            break
        c += 1
    assert taus[0] == 3.0 and taus[-1] == 1.0 and len(taus) >= 5
    assert all(a > b for a, b in zip(taus, taus[1:-1]))           # cooling down ...
    assert all(a > b for a, b in zip(small, small[1:-1]))         # ... so the small set shrinks
    assert small[-1] == pytest.approx(600 / sum(SIZES), rel=0.01)  # to its natural share


def test_mixture_draws_depend_only_on_seed_and_cursors():
    ds = np.repeat([0, 1], [50, 7])
    a = Mixture(ds, 2, seed=3, mixture="temperature", temperature=4.0, round_size=40)
    b = Mixture(ds, 2, seed=3, mixture="temperature", temperature=4.0, round_size=40)
    s1, q1 = a.draw([0, 0], 0.0)
    s2, q2 = a.draw(q1, 0.0)
    t2, _ = b.draw(q1, 0.0)                                      # a fresh mixture, same cursors
    assert np.array_equal(s2, t2) and q1.sum() == 40
    assert set(s1[q1[0]:].tolist()) == set(range(50, 57))       # 7-sample set: all in pass 0


def test_recipe_checks_of_the_mixture_fields(in_root):
    with pytest.raises(RecipeError) as e:
        load("recipes/demo.yaml", ["data.temperature=2.0", "data.round_size=-1",
                                   "data.mixture=temperture", "data.attention_cost_length=0"])
    msg = str(e.value)
    assert "data.mixture: 'temperture' is not one of size, temperature" in msg
    with pytest.raises(RecipeError) as e:
        load("recipes/demo.yaml", ["data.temperature=2.0", "data.round_size=-1",
                                   "data.attention_cost_length=0", "data.tile_cost=-1"])
    msg = str(e.value)
    assert "data.temperature: only used with data.mixture=temperature" in msg
    assert "data.round_size: must be >= 0" in msg
    assert "data.attention_cost_length: must be > 0" in msg
    assert "data.tile_cost: must be >= 0" in msg
    with pytest.raises(RecipeError, match="data.temperature: must be > 0"):
        load("recipes/demo.yaml", ["data.mixture=temperature", "data.temperature=0"])
    with pytest.raises(RecipeError, match="data.temperature_end: only used with"):
        load("recipes/demo.yaml", ["data.mixture=temperature", "data.temperature_end=2"])
    r = load("recipes/demo.yaml", ["data.mixture=temperature", "data.temperature=3",
                                   "data.temperature_schedule=linear"])
    assert (r.data.temperature, r.data.temperature_end, r.data.rank_balance) == (3.0, 1.0, "compute")
