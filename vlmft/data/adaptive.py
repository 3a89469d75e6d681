"""Adaptive per-dataset loss weights from evaluation losses (``data.adaptive``).

At every evaluation the training loop hands :meth:`AdaptiveWeights.update` one held-out loss
per training dataset, L_i(k) at evaluation k, and gets back a weight w_i per dataset. The
weights average 1 over the datasets.

progress (M2-omni's dynamically adaptive balance)
    M2-omni keeps its modalities and tasks converging together: a task whose loss falls more
    slowly than the others' gets more weight. Here the rate of dataset i since the previous
    evaluation is r_i = L_i(k) / L_i(k-1) (below 1: its loss fell; the larger, the slower),
    and the raw weight is r_i / mean_j r_j: above 1 for the datasets that fell slower than the
    average. At the first evaluation there is no rate yet and every raw weight is 1.
difficulty (VisATB, Adaptive Task Balancing for visual instruction tuning)
    VisATB weighs a task by its intra-task difficulty, how far its held-out loss is from the
    best it has reached. Here D_i = L_i(k) / min_{j <= k} L_i(j) (1 at a new best, above 1 when
    the loss has risen since), and the raw weight is D_i / mean_j D_j. (VisATB also weighs a
    task's contribution to the others; that term is not implemented.)

Then, for both: the raw weights are scaled by the one factor s that makes
mean_i clip(s x raw_i, floor, cap) = 1 (found by bisection; floor <= 1 <= cap), and
smoothed: w <- smoothing x w_previous + (1 - smoothing) x w_target, starting from w = 1.
A convex mix of two vectors within [floor, cap] that average 1 is one too.

How the weights act. They multiply each dataset's ``loss_weight``, the d(s) of the objective
in vlmft/loss.py: d_i = loss_weight_i x w_i (:meth:`AdaptiveWeights.apply`). The loss stays
exactly normalized over each optimizer step (W is the sum of the same coefficients), the pack
plan does not change (no resampling, so the plan's world-size invariance and O(1) resume are
untouched), and the state (:meth:`state_dict`) is a few floats per dataset, stored with a
checkpoint, so a resumed run continues with the same weights exactly. Changing sampling shares
instead would re-plan the rounds from the evaluation on.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

MODES = ("progress", "difficulty")
BISECTION_STEPS = 100


class AdaptiveWeights:
    """Per-dataset weights updated from evaluation losses (see the module doc)."""

    def __init__(self, datasets: Sequence[str], mode: str, *, floor: float = 0.5, cap: float = 2.0,
                 smoothing: float = 0.5):
        if mode not in MODES:
            raise ValueError(f"adaptive: {mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 < floor <= 1.0 <= cap or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"adaptive: need 0 < floor <= 1 <= cap and 0 <= smoothing < 1, got "
                             f"{floor}, {cap}, {smoothing}")
        if not datasets or len(set(datasets)) != len(datasets):
            raise ValueError(f"adaptive: dataset names must be given and distinct, got {list(datasets)}")
        self.names, self.mode = list(datasets), mode
        self.floor, self.cap, self.smoothing = float(floor), float(cap), float(smoothing)
        self.weights = {n: 1.0 for n in self.names}
        self.last: dict[str, float] = {}     # losses at the previous evaluation
        self.best: dict[str, float] = {}     # lowest loss seen per dataset
        self.evals = 0

    @classmethod
    def from_config(cls, data, datasets: Sequence[str]) -> AdaptiveWeights:
        """From the recipe's ``data`` section (data.adaptive must not be none)."""
        return cls(datasets, data.adaptive, floor=data.adaptive_floor, cap=data.adaptive_cap,
                   smoothing=data.adaptive_smoothing)

    def update(self, eval_losses: Mapping[str, float]) -> dict[str, float]:
        """Take one evaluation's loss per dataset; return the new weights (name -> w)."""
        missing = [n for n in self.names if n not in eval_losses]
        if missing:
            raise ValueError(f"adaptive: no evaluation loss for dataset(s) {', '.join(missing)}")
        loss = {n: float(eval_losses[n]) for n in self.names}
        bad = [n for n, v in loss.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"adaptive: evaluation loss must be finite and > 0, got "
                             + ", ".join(f"{n}={loss[n]}" for n in bad))
        self.best = {n: min(loss[n], self.best.get(n, loss[n])) for n in self.names}
        if self.mode == "progress":
            raw = [loss[n] / self.last[n] if self.last else 1.0 for n in self.names]
        else:
            raw = [loss[n] / self.best[n] for n in self.names]
        target = self._bounded(raw)
        s = self.smoothing
        self.weights = {n: s * self.weights[n] + (1.0 - s) * w for n, w in zip(self.names, target)}
        self.last, self.evals = loss, self.evals + 1
        return dict(self.weights)

    def _bounded(self, raw: list[float]) -> list[float]:
        """clip(f x raw, floor, cap) with the f in (0, inf) that makes the mean 1."""
        mean = sum(raw) / len(raw)
        raw = [r / mean for r in raw]                     # mean 1 before clipping

        def avg(f: float) -> float:
            return sum(min(max(f * r, self.floor), self.cap) for r in raw) / len(raw)

        lo, hi = 0.0, 1.0
        while avg(hi) < 1.0:
            hi *= 2.0
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if avg(mid) < 1.0 else (lo, mid)
        return [min(max(hi * r, self.floor), self.cap) for r in raw]

    def apply(self, loss_weights: Mapping[str, float]) -> dict[str, float]:
        """Each dataset's d_i = loss_weight_i x w_i (what vlmft/loss.py weighs its tokens by)."""
        return {n: float(loss_weights[n]) * self.weights[n] for n in self.names}

    def state_dict(self) -> dict:
        """Plain data (JSON-safe floats round-trip exactly) for a checkpoint."""
        return {"mode": self.mode, "names": list(self.names), "weights": dict(self.weights),
                "last": dict(self.last), "best": dict(self.best), "evals": self.evals}

    def load_state_dict(self, state: Mapping) -> None:
        if state["mode"] != self.mode or list(state["names"]) != self.names:
            raise ValueError(f"adaptive: the state is for {state['mode']} over {state['names']}, this "
                             f"run uses {self.mode} over {self.names}")
        self.weights = {n: float(state["weights"][n]) for n in self.names}
        self.last = {n: float(v) for n, v in state["last"].items()}
        self.best = {n: float(v) for n, v in state["best"].items()}
        self.evals = int(state["evals"])
