"""Adaptive dataset weights (data.adaptive): the update rules on synthetic loss sequences, the
bounds, and exact resume; the recipe's checks; in training on two synthetic datasets of
different difficulty, the weights that follow the held-out losses, act on the loss, and come
back exactly after a resume."""

from __future__ import annotations

import json
import math

import pytest

from vlmft.data.adaptive import AdaptiveWeights
from vlmft.recipe import RecipeError, load

from .conftest import DEMO


def toy_training(aw: AdaptiveWeights, evals: int, losses: dict, rate: dict) -> list[tuple[dict, dict]]:
    """A stand-in for training between evaluations: each dataset's loss falls by a factor that
    grows with its weight, L <- 0.1 + (L - 0.1) x (1 - rate x w). Returns (losses, weights)
    per evaluation."""
    out = []
    for _ in range(evals):
        w = aw.update(losses)
        out.append((dict(losses), dict(w)))
        losses = {n: 0.1 + (v - 0.1) * (1.0 - rate[n] * w[n]) for n, v in losses.items()}
    return out, losses


def test_progress_raises_the_weight_of_the_dataset_that_falls_slower():
    aw = AdaptiveWeights(["easy", "hard"], "progress", floor=0.5, cap=2.0, smoothing=0.5)
    hist, _ = toy_training(aw, 12, {"easy": 3.0, "hard": 3.0}, {"easy": 0.30, "hard": 0.05})
    hard = [w["hard"] for _, w in hist]
    assert hard[0] == 1.0                                   # no rate at the first evaluation
    assert hard[0] < hard[1] < hard[2] < hard[3]            # rises while easy falls faster
    assert all(w > 1.05 for w in hard[1:]) and max(hard) > 1.1
    assert all(w["easy"] < 1.0 for _, w in hist[1:])
    for _, w in hist:                                       # bounded, average 1
        assert 0.5 <= min(w.values()) and max(w.values()) <= 2.0
        assert sum(w.values()) / 2 == pytest.approx(1.0, abs=1e-12)


def test_progress_weights_by_hand():
    """Two evaluations: rates 0.5 and 0.9, raw = rate / mean = 0.5/0.7, 0.9/0.7; smoothing 0 and
    a wide band leave them as they are."""
    aw = AdaptiveWeights(["a", "b"], "progress", floor=0.1, cap=10.0, smoothing=0.0)
    aw.update({"a": 2.0, "b": 1.0})
    w = aw.update({"a": 1.0, "b": 0.9})
    assert w["a"] == pytest.approx(0.5 / 0.7) and w["b"] == pytest.approx(0.9 / 0.7)
    # with smoothing 0.25 a third evaluation moves only three quarters of the way
    aw2 = AdaptiveWeights(["a", "b"], "progress", floor=0.1, cap=10.0, smoothing=0.25)
    aw2.update({"a": 2.0, "b": 1.0})
    w2 = aw2.update({"a": 1.0, "b": 0.9})
    assert w2["a"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.5 / 0.7)


def test_difficulty_weighs_the_distance_from_the_best_loss():
    aw = AdaptiveWeights(["a", "b", "c"], "difficulty", floor=0.1, cap=10.0, smoothing=0.0)
    aw.update({"a": 2.0, "b": 2.0, "c": 2.0})
    aw.update({"a": 1.0, "b": 1.5, "c": 1.0})                 # bests 1.0, 1.5, 1.0
    w = aw.update({"a": 1.5, "b": 1.5, "c": 1.0})             # a rose 50% above its best
    raw = [1.5, 1.0, 1.0]
    assert [w[n] for n in "abc"] == pytest.approx([r / (sum(raw) / 3) for r in raw])
    assert w["a"] > w["b"] == pytest.approx(w["c"])


def test_floor_and_cap_hold_and_the_mean_stays_one():
    aw = AdaptiveWeights(list("abcd"), "difficulty", floor=0.8, cap=1.1, smoothing=0.0)
    aw.update({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    w = aw.update({"a": 9.0, "b": 1.0, "c": 1.0, "d": 0.5})
    assert max(w.values()) == pytest.approx(1.1) and min(w.values()) >= 0.8
    assert sum(w.values()) / 4 == pytest.approx(1.0, abs=1e-12)
    assert aw.apply({"a": 2.0, "b": 1.0, "c": 1.0, "d": 0.0}) == \
        {"a": 2.0 * w["a"], "b": w["b"], "c": w["c"], "d": 0.0}


@pytest.mark.parametrize("mode", ["progress", "difficulty"])
def test_a_resumed_run_reproduces_the_weights_and_losses_exactly(mode):
    start, rate = {"x": 2.5, "y": 2.0, "z": 4.0}, {"x": 0.2, "y": 0.05, "z": 0.1}
    ref, _ = toy_training(AdaptiveWeights(list("xyz"), mode), 15, start, rate)
    first = AdaptiveWeights(list("xyz"), mode)
    head, losses = toy_training(first, 6, start, rate)
    state = json.loads(json.dumps(first.state_dict()))     # as a checkpoint stores it
    resumed = AdaptiveWeights(list("xyz"), mode)
    resumed.load_state_dict(state)
    tail, _ = toy_training(resumed, 9, losses, rate)
    assert head + tail == ref                               # bit-for-bit, weights and losses
    with pytest.raises(ValueError, match="this run uses"):
        AdaptiveWeights(list("xy"), mode).load_state_dict(state)


def test_bad_inputs_are_refused():
    aw = AdaptiveWeights(["a", "b"], "progress")
    with pytest.raises(ValueError, match="no evaluation loss for dataset"):
        aw.update({"a": 1.0})
    with pytest.raises(ValueError, match="finite"):
        aw.update({"a": 1.0, "b": math.nan})
    with pytest.raises(ValueError, match="not one of"):
        AdaptiveWeights(["a"], "gradnorm")
    with pytest.raises(ValueError, match="floor"):
        AdaptiveWeights(["a"], "progress", floor=1.5)


@pytest.mark.parametrize("override, message", [
    (["data.adaptive=progress", "data.eval=[]"], "data.adaptive: progress needs evaluation datasets"),
    (["data.adaptive=progress"], "data.adaptive: the weights change at each evaluation; set eval.every_steps > 0"),
    (["data.adaptive=difficulty", "eval.every_steps=5", "data.eval.0.measures=''", "data.eval.0.name=other"],
     "data.adaptive: no data.eval set measures train; add one with measures: train"),
    (["data.adaptive_cap=3.0"], "data.adaptive_cap: only used with data.adaptive"),
    (["data.adaptive_floor=1.5"], "data.adaptive_floor: must be in (0, 1]"),
])
def test_recipe_refuses_adaptive_without_a_set_measuring_each_dataset(override, message, in_root):
    with pytest.raises(RecipeError) as e:
        load(DEMO, override)
    assert any(message in line for line in e.value.errors), e.value.errors
    assert load(DEMO, ["data.adaptive=progress", "eval.every_steps=5"]).data.adaptive == "progress"


# ------------------------------------------------------------------------------------------
# In training: two synthetic datasets of different difficulty


def two_datasets(root) -> list[str]:
    """easy: 'Say yes.' -> 'Yes.'; hard: sums in words (both text-only), and held-out sets."""
    import random

    from vlmft.demo_assets import NUMBERS

    def easy(n):
        return [{"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]}] * n

    def hard(n, seed):
        rng, rows = random.Random(seed), []
        for _ in range(n):
            a, b = rng.randint(0, 5), rng.randint(0, 5)
            rows.append({"conversations": [
                {"from": "human", "value": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"},
                {"from": "gpt", "value": f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."}]})
        return rows

    for name, rows in (("easy", easy(120)), ("hard", hard(120, 1)), ("easy_eval", easy(20)), ("hard_eval", hard(20, 3))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.datasets=[{{path: '{root}/easy.jsonl'}}, {{path: '{root}/hard.jsonl'}}]",
            f"data.eval=[{{path: '{root}/easy_eval.jsonl', measures: easy}}, "
            f"{{path: '{root}/hard_eval.jsonl', measures: hard}}]",
            "data.adaptive=progress", "eval.every_steps=4", "train.max_steps=24", "loss.reduction=token",
            "checkpoint.every_steps=12"]


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    import os

    from vlmft.distributed import setup_environment
    from vlmft.train import train

    from .conftest import ROOT

    setup_environment()
    root = tmp_path_factory.mktemp("adaptive")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load(DEMO, two_datasets(root) + [f"output_dir={root}/full"])
        train(recipe)
    finally:
        os.chdir(cwd)
    return recipe, root


def test_progress_raises_the_weight_of_the_dataset_whose_held_out_loss_falls_slower(adaptive_run, processor):
    """The weights in metrics.jsonl follow the rule from the logged held-out losses, the hard
    set (its loss falls slower) gains weight evaluation after evaluation, and the weights act on
    training: with the token reduction a step's loss is sum_i w_i L_i N_i / sum_i w_i N_i over
    its datasets (L_i its per-dataset loss, N_i its supervised tokens, counted from the plan)."""
    from vlmft.data.catalog import build_catalog
    from vlmft.data.stream import PackPlan

    recipe, root = adaptive_run
    rows = _rows(root / "full")
    evals = [r for r in rows if "eval/hard_eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 20, 24]
    ref = AdaptiveWeights(["easy", "hard"], "progress")
    for r, after in zip(evals, evals[1:] + [None]):
        w = ref.update({"easy": r["eval/easy_eval/loss"], "hard": r["eval/hard_eval/loss"]})
        if after is not None:   # the next step trains with the weights of this evaluation
            nxt = next(x for x in rows if x["step"] == r["step"] + 1)
            assert nxt["adaptive/hard/weight"] == w["hard"] and nxt["adaptive/easy/weight"] == w["easy"]
    nxt = [next(x for x in rows if x["step"] == r["step"] + 1) for r in evals[:-1]]
    hard = [x["adaptive/hard/weight"] for x in nxt]
    # over the run the hard set's held-out loss fell slower, relatively, and its weight rose above
    # its start and above the easy set's (step by step the rule above decides; checked exactly)
    first, last = evals[0], evals[-2]
    assert (last["eval/hard_eval/loss"] / first["eval/hard_eval/loss"]
            > last["eval/easy_eval/loss"] / first["eval/easy_eval/loss"])
    assert hard[0] == 1.0 and hard[-1] > 1.0 and hard[-1] > nxt[-1]["adaptive/easy/weight"], hard
    catalog = build_catalog(recipe, processor)
    plan = PackPlan(recipe, catalog)
    checked = 0
    for r in rows:
        if r["step"] <= 5 or r["train/easy/loss"] is None or r["train/hard/loss"] is None:
            continue
        n = [0, 0]
        for pack in plan.step(r["step"] - 1, world=1):
            for i in pack:
                n[catalog.samples[i].dataset] += catalog.samples[i].n_supervised
        w = [r["adaptive/easy/weight"], r["adaptive/hard/weight"]]
        L = [r["train/easy/loss"], r["train/hard/loss"]]
        want = sum(wi * li * ni for wi, li, ni in zip(w, L, n)) / sum(wi * ni for wi, ni in zip(w, n))
        assert abs(r["loss"] - want) <= 1e-6 * r["loss"], r["step"]
        checked += 1
    assert checked >= 3


def test_a_resumed_run_reproduces_the_weights_and_losses_of_the_uninterrupted_one(adaptive_run, tmp_path, in_root):
    import shutil

    from vlmft.train import train

    recipe, root = adaptive_run
    out = tmp_path / "resumed"
    shutil.copytree(root / "full" / "checkpoints" / "step12", out / "checkpoints" / "step12")
    (out / "checkpoints" / "latest").write_text("step12")
    train(load(DEMO, two_datasets(root) + [f"output_dir={out}"]), resume="auto")
    full = {r["step"]: r for r in _rows(root / "full")}
    resumed = _rows(out)
    assert [r["step"] for r in resumed] == list(range(13, 25))
    keys = ("loss", "train/easy/loss", "train/hard/loss", "adaptive/easy/weight", "adaptive/hard/weight",
            "eval/easy_eval/loss", "eval/hard_eval/loss")
    for r in resumed:
        assert {k: r.get(k) for k in keys} == {k: full[r["step"]].get(k) for k in keys}, r["step"]
