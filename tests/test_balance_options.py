"""Balanced training options of the plan: compute-balanced packing (data.packing.balance_compute)
and step balance (data.step_balance), each world-size invariant and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmft.data import balance, compute_packing, sources
from vlmft.data.catalog import Catalog, SampleRef
from vlmft.data.mixture import interleave
from vlmft.data.packing import Limits, lower_bound, pack
from vlmft.data.stream import PackPlan

from .test_stream import recipe, step_packs

LSTAR, TILE = 49152.0, 64.0


def cost(L, t):
    """The cost model written out: tokens + attention (L^2 / L*) + vision tiles."""
    return sum(x + x * x / LSTAR + TILE * y for x, y in zip(L, t))


def stream(n=12_000, seed=0, cap=8192):
    """Lognormal text lengths; 40% of the samples are short with one 256-token image (1 tile)."""
    rng = np.random.default_rng(seed)
    img = rng.random(n) < 0.4
    L = np.where(img, rng.integers(40, 200, n) + 256,
                 np.clip(np.rint(rng.lognormal(np.log(900), 0.9, n)), 16, cap)).astype(np.int64)
    return L, img.astype(np.int64)


def catalog(L, t, datasets=None, images=None) -> Catalog:
    ds = np.zeros(len(L), int) if datasets is None else datasets
    nimg = t if images is None else images
    names = [f"d{i}" for i in range(int(ds.max()) + 1)]
    return Catalog([sources.Dataset(name=x, annotation=None, image_root=None) for x in names], [],
                   [SampleRef(int(d), i, int(a), int(b), max(1, int(a) // 4), num_images=int(m))
                    for i, (a, b, d, m) in enumerate(zip(L.tolist(), t.tolist(), ds.tolist(), nimg.tolist()))])


# ---------------------------------------------------------------- the compute-balanced packer

def test_balanced_packs_cost_alike_and_fill_like_best_fit():
    L, t = stream()
    cap = 8192
    tok = list(pack(L, t, Limits(cap)))
    bal = list(pack(L, t, Limits(cap), compute=(LSTAR, TILE)))
    assert sorted(i for p in bal for i in p) == list(range(len(L)))
    assert max(int(L[p].sum()) for p in bal) <= cap
    fill = lambda packs: L.sum() / (len(packs) * cap)  # noqa: E731
    assert fill(bal) >= fill(tok) - 0.002                   # within 0.2 percentage points

    def near_median(packs):
        c = np.array([cost(L[p], t[p]) for p in packs])
        return np.mean(np.abs(c / np.median(c) - 1) <= 0.01)
    assert near_median(bal) > 2 * near_median(tok) and near_median(bal) > 0.5
    # balance_compute makes a difference to the packs themselves
    assert sorted(map(tuple, bal)) != sorted(map(tuple, tok))


def test_balanced_packer_respects_a_tile_limit():
    L, t = stream(3000, seed=1, cap=4096)
    t = t * np.random.default_rng(2).integers(1, 4, len(t))
    packs = list(pack(L, t, Limits(4096, 6), window=500, max_open=8, compute=(LSTAR, TILE)))
    assert sorted(i for p in packs for i in p) == list(range(len(L)))
    assert all(L[p].sum() <= 4096 and t[p].sum() <= 6 for p in packs)


def test_guard_keeps_token_only_packs_when_balancing_would_cost_fill(monkeypatch):
    """If the balanced packing of a batch needs more packs than the allowance, the token-only
    best-fit-decreasing packing of that batch is used: here balancing is replaced by a
    packing that wastes rows (one sample a pack)."""
    L, t = stream(4000, seed=3)

    def one_a_pack(carried, items, cap, T, known):
        idx, la, ta, c = items
        return [(list(m), tk, tl, cs) for m, tk, tl, cs in carried] + \
            [([int(i)], int(x), int(y), float(z)) for i, x, y, z in zip(idx, la, ta, c)]

    monkeypatch.setattr(compute_packing, "_balanced", one_a_pack)
    packs = list(pack(L, t, Limits(8192), window=1000, compute=(LSTAR, TILE)))
    assert len(packs) <= lower_bound(L, 8192) * 1.01       # the one-a-pack packing was refused
    assert sorted(i for p in packs for i in p) == list(range(len(L)))


def test_group_steps_puts_outliers_together_and_shuffles_regular_steps():
    rng = np.random.default_rng(4)
    c = np.where(rng.random(203) < 0.7, rng.normal(1000, 3, 203), rng.uniform(600, 1300, 203))
    G, head = 8, 5
    order = balance.group_steps(c, G, head, np.random.default_rng(0))
    assert sorted(order) == list(range(203))
    assert order == balance.group_steps(c, G, head, np.random.default_rng(0))
    m = np.median(c)
    tail = (203 - head) % G
    edge = set(order[:head]) | set(order[len(order) - tail:])
    dist = np.abs(c - m)
    assert max(dist[list(edge)]) <= min(np.delete(dist, list(edge)))   # the nearest the median
    ranks = np.argsort(np.argsort(c[order[head:len(order) - tail]]))    # cost ranks in the steps
    steps = np.asarray(order[head:len(order) - tail]).reshape(-1, G)
    for s, r in zip(steps, ranks.reshape(-1, G)):
        regular = np.all(np.abs(c[s] - m) <= 0.01 * m)
        assert regular or r.max() - r.min() == G - 1, (c[s], r)        # else G neighbours in cost


# ---------------------------------------------------------------- the plan with balance_compute

SPLITS = [(1, 8), (2, 4), (8, 1)]          # (world, grad_accum_steps), micro_batch_size 1: G = 8


def _recipe(split, bc=False, step_balance="none", cap=8192, **kw):
    r = recipe(split, cap=cap, step_balance=step_balance, **kw)
    r.data.packing.balance_compute = bc
    return r


def test_one_pack_a_rank_is_balanced_with_balance_compute():
    L, t = stream(16_000, seed=5)
    cat = catalog(L, t)
    res = {}
    for bc in (False, True):
        plan = PackPlan(_recipe((8, 1), bc=bc), cat, global_batch=8)
        steps = [step_packs(plan, k, 8) for k in range(len(plan.round(0).packs) // 8)]
        costs = np.array([[cost(L[list(p)], t[list(p)]) for p in s] for s in steps])
        ratio = costs.max(axis=1) / costs.mean(axis=1)
        res[bc] = (ratio.mean(), L.sum() / (len(plan.round(0).packs) * 8192))
    assert res[True][0] <= 1.02 < res[False][0]
    assert res[True][1] >= res[False][1] - 0.002


@pytest.mark.parametrize("option", [dict(bc=True), dict(step_balance="modality"),
                                    dict(step_balance="dataset", mixture="temperature", temperature=2.0)])
def test_options_keep_the_plan_world_size_invariant_and_resumable(option):
    L, t = stream(6000, seed=6, cap=2048)
    ds = np.random.default_rng(7).integers(0, 3, len(L))
    images = t * np.random.default_rng(8).integers(1, 3, len(L))      # one or two images
    cat = catalog(L, t, ds, images)
    mk = lambda split: PackPlan(_recipe(split, cap=2048, round_size=2500, **option), cat, global_batch=8)  # noqa: E731
    ref_plan = mk(SPLITS[0])
    n = len(ref_plan.round(0).packs) // 8
    steps = range(0, 2 * n + 5)
    ref = [step_packs(ref_plan, k, 1) for k in steps]
    for s in SPLITS[1:]:
        plan = mk(s)
        assert [step_packs(plan, k, s[0]) for k in steps] == ref, s
    boundary = ref_plan.round(1).start // 8
    for k, split in [(n // 2, (2, 4)), (boundary + 3, (8, 1))]:
        state = json.loads(json.dumps(ref_plan.state_dict(k)))
        fresh = mk(split)
        built, build = [], fresh._build
        fresh._build = lambda c: built.append(c) or build(c)
        assert fresh.load_state_dict(state) == k
        assert [step_packs(fresh, j, split[0]) for j in steps[k:]] == ref[k:], (k, split)
        assert min(built) == state["round"]                      # O(1): no earlier round replayed


# ---------------------------------------------------------------- step balance

def test_interleave_follows_the_largest_deficit():
    a = [[1, 2, 3], [4, 5, 6]]          # group 0: 6 samples
    b = [[7, 8]]                        # group 1: 2 samples; shares 3/4, 1/4
    assert interleave([a, b]) == [[1, 2, 3], [7, 8], [4, 5, 6]]
    assert interleave([[], b]) == [[7, 8]] and interleave([[], []]) == []


def _image_share_spread(plan, cat, steps):
    out = []
    for k in steps:
        packs = plan.step(k, 1)
        n = sum(len(p) for p in packs)
        m = sum(cat.samples[i].num_images > 0 for p in packs for i in p)
        out.append((m, n, max(len(p) for p in packs)))
    return out


def test_step_balance_modality_holds_every_steps_image_share_within_one_pack():
    """70% text-only and 30% one-image samples, 32 packs (~135 samples) a step: with
    step_balance=modality every step's image samples are within one pack's samples of 30% of
    the step's samples; without it the share wanders about three times as far."""
    rng = np.random.default_rng(9)
    n = 8000
    img = rng.permutation(n) < int(0.3 * n)
    L = np.where(img, rng.integers(300, 700, n), np.clip(np.rint(rng.lognormal(np.log(400), 0.6, n)), 30, 2048))
    cat = catalog(L.astype(np.int64), img.astype(np.int64))
    G = 32
    spread = {}
    for mode in ("none", "modality"):
        plan = PackPlan(_recipe((1, G), cap=2048, step_balance=mode), cat)
        steps = range(2 * len(plan.round(0).packs) // G)                  # two rounds
        rows = _image_share_spread(plan, cat, steps)
        biggest = max(len(p) for c in (0, 1, 2) for p in plan.round(c).packs)
        dev = [abs(m - 0.3 * k) for m, k, _ in rows]
        spread[mode] = (max(dev) / biggest, max(abs(m / k - 0.3) for m, k, _ in rows))
        if mode == "modality":
            assert max(dev) <= biggest, (max(dev), biggest)
    assert spread["none"][0] > 2 * spread["modality"][0]
    assert spread["none"][1] > 2 * spread["modality"][1]


def test_step_balance_dataset_holds_each_datasets_share():
    L, t = stream(6000, seed=10, cap=2048)
    ds = np.random.default_rng(11).choice(3, len(L), p=[0.6, 0.3, 0.1])
    cat = catalog(L, t, ds)
    plan = PackPlan(_recipe((1, 8), cap=2048, step_balance="dataset"), cat)
    share = np.bincount(ds, minlength=3) / len(ds)
    biggest = max(len(p) for p in plan.round(0).packs)
    for k in range(len(plan.round(0).packs) // 8):
        packs = plan.step(k, 1)
        got = np.bincount([int(ds[i]) for p in packs for i in p], minlength=3)
        assert np.all(np.abs(got - share * got.sum()) <= biggest), (k, got)
