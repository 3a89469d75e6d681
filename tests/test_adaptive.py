"""Adaptive dataset weights (data.adaptive): the update rules on synthetic loss sequences, the
bounds, and exact resume; the recipe refuses the knob until evaluation datasets exist."""

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
    ("data.adaptive=progress", "data.adaptive: progress needs evaluation datasets (data.eval)"),
    ("data.adaptive_cap=3.0", "data.adaptive_cap: only used with data.adaptive"),
    ("data.adaptive_floor=1.5", "data.adaptive_floor: must be in (0, 1]"),
])
def test_recipe_refuses_adaptive_until_evaluation_exists(override, message, in_root):
    with pytest.raises(RecipeError) as e:
        load(DEMO, [override])
    assert any(message in line for line in e.value.errors), e.value.errors
