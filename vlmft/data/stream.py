"""From datasets to the packs each rank trains on at each optimizer step.

    catalog of usable samples (length, tiles, n_sup, dataset)
      --mixture (mixture.py): round c draws R samples, q_i from dataset i, at the round's tau
      --shuffle(seed, c)--> packer --> the round's packs --shuffle(seed, c)--> global pack sequence
    step k takes packs [k*G, (k+1)*G), G = micro_batch_size x grad_accum_steps x world_size
      --balance.py--> this rank's grad_accum_steps micro-batches of micro_batch_size packs

The packs of step k depend only on the recipe, the seed and G, never on how G is split into
ranks and accumulation steps: (1 rank x 4 accumulation), (2 x 2) and (4 x 1) train on the same
packs. The packs of a round are shuffled before they are cut into steps (the packer emits them
in an order correlated with length). Two options change how a round's packs are laid out:
``data.step_balance`` packs each group (dataset or modality) on its own and interleaves the
groups' shuffled packs so that every step holds each group's share (mixture.interleave);
``data.packing.balance_compute`` packs for equal compute and then orders the shuffled packs so
that the packs off the median cost share steps (balance.group_steps, which needs G).

Where the plan stands is a few integers: the round c holding step k's first pack, the global
index of that round's first pack, and one cursor per dataset (see mixture.py). ``state_dict``
returns them; ``load_state_dict`` puts a fresh plan there, so a resumed run plans one round
(the one it resumes in) and replays nothing: the same packs as the uninterrupted run, on any
world size with the same global batch. Without a saved state a plan walks the rounds from 0
(packing lengths only, no tensors).

A micro-batch is the ``micro_batch_size`` packs it holds laid end to end in one row (batch size
1, no padding); position ids restart at every sample, which is how transformers' sdpa, eager
and flash-attention paths isolate packed samples.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..recipe import Recipe, RecipeError
from ..loss import IGNORE_INDEX
from ..models import family_of
from . import balance, chat, tokens
from .catalog import Catalog, SampleRef, max_tiles, segments
from .images import ImageProblem
from .mixture import TAG_PACKS, TAG_ROUND, TAG_STEPS, Mixture, groups, interleave, rng

ROUNDS_KEPT = 3


@dataclass
class Round:
    index: int
    start: int               # global index of its first pack
    packs: list[list[int]]   # catalog sample indices, in training order
    costs: np.ndarray        # estimated compute per pack (balance.pack_costs)
    tau: float
    quotas: np.ndarray       # samples drawn per dataset


def packer_args(data) -> tuple:
    """The recipe's ``data`` section as ``packing.pack`` arguments: (Limits, knobs), the
    strategy apart (pack-stats runs every strategy with the same knobs; ``compute`` is
    best_fit's only and is left out for the others)."""
    from . import packing

    cfg = data.packing
    compute = (data.attention_cost_length, data.tile_cost) if cfg.balance_compute else None
    return packing.Limits(cfg.max_packed_tokens, cfg.num_images_expected), dict(
        window=cfg.window, max_open=cfg.max_buffer_size, allow_overflow=cfg.allow_overflow,
        compute=compute)


class PackPlan:
    """The global sequence of packs over rounds, and each step's deal to ranks.

    ``global_batch`` (G) fixes where a tau schedule stands (progress = packs / (max_steps x G));
    left None it is taken from the first ``step``/``rank_step``/``load_state_dict`` call
    (micro_batch_size x grad_accum_steps x world); rounds after the first need it only under
    ``temperature_schedule=linear``."""

    def __init__(self, recipe: Recipe, catalog: Catalog, global_batch: int | None = None):
        if not catalog.samples:
            raise RecipeError(["data.datasets: no usable sample (dropped: "
                               + ", ".join(f"{k}={v}" for k, v in catalog.dropped.items()) + ")"])
        self.recipe, self.catalog = recipe, catalog
        s = catalog.samples
        self.lengths = np.fromiter((x.length for x in s), dtype=np.int64, count=len(s))
        tiles = np.fromiter((x.tiles for x in s), dtype=np.int64, count=len(s))
        self.tiles = tiles if tiles.any() else None
        self.mix = Mixture.from_recipe(recipe, catalog)
        mode = recipe.data.step_balance
        self.groups = None if mode == "none" else groups(s, mode)
        self.G = global_batch
        self._bounds: dict[int, tuple[int, np.ndarray]] = {0: (0, np.zeros(len(catalog.datasets), np.int64))}
        self._rounds: dict[int, Round] = {}
        self._dealt: tuple | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the pack sequence

    def global_batch(self, world: int | None = None) -> int:
        t = self.recipe.train
        if world is None:
            if self.G is None:
                raise ValueError("this plan's global batch is not known yet: pass global_batch to "
                                 "PackPlan, or world to step/rank_step")
            return self.G
        g = t.global_batch(world)
        if self.G is None:
            self.G = g
        elif g != self.G:
            raise ValueError(f"global batch {g} (micro_batch_size {t.micro_batch_size} x grad_accum_steps "
                             f"{t.grad_accum_steps} x world {world}) differs from this plan's {self.G}")
        return self.G

    def round(self, c: int) -> Round:
        with self._lock:
            r = self._rounds.get(c)
            if r is None:
                k = max(i for i in self._bounds if i <= c)
                while k < c:             # walk from the last known boundary
                    self._build(k)
                    k += 1
                r = self._build(c)
            return r

    def _build(self, c: int) -> Round:
        if c in self._rounds:
            return self._rounds[c]
        start, cursors = self._bounds[c]
        progress = self._progress(start)
        seed = self.recipe.train.seed
        samples, q = self.mix.draw(cursors, progress)
        order = samples[rng(seed, TAG_ROUND, c).permutation(len(samples))]
        if self.groups is None:
            packs = self._shuffled_packs(order, seed, c)
        else:                                           # step balance: per group, interleaved
            gid = self.groups[order]
            packs = interleave([self._shuffled_packs(order[gid == g], seed, c, g + 1)
                                for g in range(int(self.groups.max()) + 1)])
        d = self.recipe.data
        costs = balance.pack_costs(self.lengths, self.tiles, packs,
                                   attention_length=d.attention_cost_length, tile_cost=d.tile_cost)
        if d.packing.balance_compute and d.packing.enabled:
            G = self.global_batch()
            seq = balance.group_steps(costs, G, (-start) % G, rng(seed, TAG_STEPS, c))
            packs, costs = [packs[i] for i in seq], costs[seq]
        r = Round(c, start, packs, costs, self.mix.tau(progress), q)
        self._bounds[c + 1] = (start + len(packs), cursors + q)
        self._rounds[c] = r
        while len(self._rounds) > ROUNDS_KEPT:
            self._rounds.pop(min(self._rounds))
        return r

    def _progress(self, start: int) -> float:
        """Training progress at global pack ``start`` (what a tau schedule needs)."""
        if start == 0 or self.recipe.data.temperature_schedule == "constant":
            return 0.0       # tau does not depend on it
        if self.G is None:
            raise ValueError("a tau schedule needs the global batch: pass global_batch to PackPlan "
                             "or call step/rank_step (which set it) first")
        return start / (self.recipe.train.max_steps * self.G)

    def _shuffled_packs(self, order: np.ndarray, seed: int, c: int, *group: int) -> list[list[int]]:
        """``order``'s samples packed (catalog indices), the packs in a seeded random order."""
        ol = order.tolist()
        packs = [[ol[i] for i in p] for p in self._pack(order)]
        return [packs[i] for i in rng(seed, TAG_PACKS, c, *group).permutation(len(packs)).tolist()]

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Packs as positions into ``order``."""
        cfg = self.recipe.data.packing
        if not cfg.enabled:
            return [[i] for i in range(len(order))]
        from . import packing

        limits, knobs = packer_args(self.recipe.data)
        if cfg.strategy != "best_fit":
            knobs.pop("compute")
        return list(packing.pack(self.lengths[order], None if self.tiles is None else self.tiles[order],
                                 limits, strategy=cfg.strategy, **knobs))

    def epoch(self, e: int) -> list[list[int]]:
        """The packs of round e (an epoch under the default mixture and round size)."""
        return self.round(e).packs

    def locate(self, j: int) -> int:
        """The round that holds global pack j."""
        with self._lock:
            c = max(i for i, (s, _) in self._bounds.items() if s <= j)
            while True:
                r = self.round(c)
                if j < r.start + len(r.packs):
                    return c
                c += 1

    def _span(self, start: int, count: int) -> tuple[list[list[int]], np.ndarray]:
        packs, costs, j = [], [], start
        with self._lock:
            while j < start + count:
                r = self.round(self.locate(j))
                a, b = j - r.start, min(start + count, r.start + len(r.packs)) - r.start
                packs += r.packs[a:b]
                costs.append(r.costs[a:b])
                j += b - a
        return packs, np.concatenate(costs) if costs else np.zeros(0)

    def packs(self, start: int, count: int) -> list[list[int]]:
        """Global packs [start, start+count), crossing round boundaries."""
        return self._span(start, count)[0]

    def step(self, k: int, world: int | None = None) -> list[list[int]]:
        """The G packs of optimizer step k (the same whatever the split of G)."""
        G = self.global_batch(world)
        return self.packs(k * G, G)

    def rank_step(self, k: int, rank: int, world: int) -> list[list[list[int]]]:
        """This rank's grad_accum_steps micro-batches of step k, each a list of
        micro_batch_size packs, dealt by ``data.rank_balance``."""
        t = self.recipe.train
        G = self.global_batch(world)
        with self._lock:
            if self._dealt is None or self._dealt[0] != (k, world):
                packs, costs = self._span(k * G, G)
                if self.recipe.data.rank_balance == "compute":
                    a = balance.assign(costs, world, t.micro_batch_size, t.grad_accum_steps)
                else:
                    a = balance.round_robin(G, world, t.micro_batch_size)
                self._dealt = ((k, world), packs, a)
            _, packs, a = self._dealt
        return [[packs[j] for j in mb] for mb in a[rank]]

    # ------------------------------------------------------------------ resumable state

    def state_dict(self, step: int) -> dict:
        """Where the plan stands at the start of optimizer step ``step`` (a few integers)."""
        G = self.global_batch()
        with self._lock:
            c = self.locate(step * G)
            start, cursors = self._bounds[c]
        return {"step": int(step), "global_batch": int(G), "round": int(c), "round_start": int(start),
                "cursors": [int(x) for x in cursors], "samples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> int:
        """Continue from a saved state (any world size with the same global batch); returns
        its step. A state holding only ``step`` is found by walking the rounds from 0."""
        if "round" not in state:
            return int(state["step"])
        if state["samples"] != len(self.lengths) or len(state["cursors"]) != len(self.catalog.datasets):
            raise ValueError(f"the data changed since this state was saved: {state['samples']} samples in "
                             f"{len(state['cursors'])} datasets then, {len(self.lengths)} in "
                             f"{len(self.catalog.datasets)} now")
        if self.G is None:
            self.G = int(state["global_batch"])
        elif self.G != state["global_batch"]:
            raise ValueError(f"the state was saved with global batch {state['global_batch']}, this plan "
                             f"has {self.G}: keep micro_batch_size x grad_accum_steps x world the same")
        with self._lock:
            c = int(state["round"])
            self._bounds[c] = (int(state["round_start"]), np.asarray(state["cursors"], dtype=np.int64))
            self._rounds = {i: r for i, r in self._rounds.items() if i < c}
            self._bounds = {i: b for i, b in self._bounds.items() if i <= c}
        return int(state["step"])


class Materializer:
    """Encodes samples (decodes images) and lays packs out as training tensors.

    A sample that fails here (e.g. an image whose header reads but whose data is truncated) is
    counted in ``catalog.dropped`` and in the micro-batch's ``num_bad``; ``bad_log`` lists the
    last ``micro_batch`` call's as (reason, "file:line", detail), for a worker to report them
    to the main process."""

    def __init__(self, recipe: Recipe, catalog: Catalog, processor):
        self.recipe, self.catalog, self.processor = recipe, catalog, processor
        self.family = family_of(processor)
        self.image_ids = tokens.image_ids(processor)
        self.bad_log: list[tuple[str, str, str]] = []

    def _bad(self, reason: str, where: str, detail: str) -> None:
        self.catalog.drop(reason, where, detail)
        self.bad_log.append((reason, where, detail))

    def sample(self, ref: SampleRef) -> tokens.Encoded | None:
        rec = self.catalog.records[ref.record]
        segs = segments(self.processor, self.catalog, rec)
        mt = max_tiles(self.recipe, self.catalog, rec)
        try:
            enc = tokens.encode(self.processor, segs, mt, expected=ref.planned or ref.length)
        except (chat.BadSample, ImageProblem) as exc:  # e.g. a header that decodes badly
            self._bad(exc.reason, rec.where, exc.detail)
            return None
        if len(enc.input_ids) > ref.length:
            enc = tokens.truncate(enc, ref.length, self.image_ids)
            if enc is None:
                self._bad("too_long", rec.where, "no text boundary to truncate at")
        return enc

    def micro_batch(self, packs: list[list[int]]) -> dict:
        """Packs laid end to end in one row. Labels are shifted here, per sample: labels[t] is
        the target of the prediction at t, and the last token of a sample has none.
        ``sample_dataset[k]``: the dataset of the row's sample k (-1 for the pad of an all-bad
        micro-batch)."""
        encs, lw, ds = [], [], []
        self.bad_log = []
        for pack in packs:
            for i in pack:
                ref = self.catalog.samples[i]
                enc = self.sample(ref)
                if enc is not None:
                    encs.append(enc)
                    lw.append(self.catalog.datasets[ref.dataset].loss_weight)
                    ds.append(ref.dataset)
        n = len(encs)
        if not encs:  # every sample of this micro-batch went bad: one pad token, weight 0
            pad = self.processor.tokenizer.pad_token_id
            encs, lw, ds = [tokens.Encoded([pad], [IGNORE_INDEX], token_row=[0] if self.family.token_key else None)], [0.0], [-1]
        batch = row(encs, lw, self.family)
        batch.update(num_samples=n, num_bad=sum(len(p) for p in packs) - n,
                     sample_dataset=torch.tensor(ds, dtype=torch.long))
        return batch


def row(encs: list[tokens.Encoded], loss_weights: list[float], family) -> dict:
    """Samples laid end to end in one row [1, L]: ids, labels shifted within each sample, sample
    ids, restarting positions (packing.layout), per-token loss weights, the family's per-token
    row and its per-image tensors joined (Family.join)."""
    from .packing import layout

    lens = [len(e.input_ids) for e in encs]
    pos, sid, _ = layout(lens)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)[None]  # noqa: E731
    keys = {k for e in encs for k in e.vision}
    vision = {k: family.join(k, [e.vision[k] for e in encs if k in e.vision]) for k in sorted(keys)}
    return {
        "input_ids": t([i for e in encs for i in e.input_ids]),
        "labels": t([x for e in encs for x in e.labels[1:] + [IGNORE_INDEX]]),
        "position_ids": torch.from_numpy(pos)[None], "sample_ids": torch.from_numpy(sid)[None],
        "loss_weight": t([w for e, w in zip(encs, loss_weights) for _ in e.input_ids], torch.float32),
        "tokens": t([x for e in encs for x in e.token_row]) if family.token_key else None,
        "vision": vision or None,
    }
