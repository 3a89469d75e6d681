"""From datasets to the micro-batches each rank trains on at each optimizer step.

    records --plan (text + image headers)--> catalog of usable samples (length, tiles, n_sup)
            --shuffle(seed, epoch)--> packer --> epoch's packs --> global pack sequence
    step k takes packs [k*G, (k+1)*G), G = micro_batch_size x grad_accum_steps x world_size

The packs of step k depend only on the recipe, the seed and G, never on how G is split into
ranks and accumulation steps: (1 rank x 4 accumulation) and (2 x 2) train on the same packs.
The stream's state is the step number alone, so resuming is O(1): no replay.

A micro-batch is the ``micro_batch_size`` packs it holds laid end to end in one row (batch size
1, no padding); position ids restart at every sample, which is how transformers' sdpa, eager
and flash-attention paths isolate packed samples.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from ..recipe import Recipe, RecipeError
from . import chat, sources
from .images import ImageProblem

IGNORE = -100
EXAMPLES_PER_REASON = 3


@dataclass
class SampleRef:
    dataset: int
    record: int          # index into Catalog.records
    length: int
    tiles: int
    n_supervised: int


@dataclass
class Catalog:
    """Every record read, the usable samples planned, and the dropped ones counted by reason."""
    datasets: list[sources.Dataset]
    records: list[sources.Record]
    samples: list[SampleRef] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> ["file:line: detail"]
    truncated: int = 0

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{where}: {detail}" if detail else where)


def build_catalog(recipe: Recipe, processor, *, limit: int = 0, on_step=None) -> Catalog:
    """Read and plan every record (no pixels decoded). ``on_step(n)`` reports progress."""
    datasets = sources.expand(recipe.data.datasets)
    records = []
    for i, ds in enumerate(datasets):
        records += sources.read(i, ds, recipe.train.seed, limit=limit)
    cat = Catalog(datasets, records)
    cap = recipe.data.packing.max_packed_tokens
    strict = recipe.data.on_bad_sample == "error"
    for idx, rec in enumerate(records):
        if on_step:
            on_step(idx + 1)
        try:
            if rec.error:
                raise chat.BadSample(rec.error, rec.detail)
            p = chat.plan(processor, _segments(processor, cat, rec), _max_tiles(recipe, cat, rec))
            if p.n_supervised == 0:
                raise chat.BadSample("no_supervised_tokens")
            if p.length > cap and recipe.data.packing.overlong == "drop":
                raise chat.BadSample("too_long", f"{p.length} tokens > max_packed_tokens={cap}")
            if p.length > cap:
                cat.truncated += 1
            tile_cap = recipe.data.packing.num_images_expected
            if tile_cap and p.tiles > tile_cap:
                raise chat.BadSample("too_many_tiles", f"{p.tiles} tiles > num_images_expected={tile_cap}")
            cat.samples.append(SampleRef(rec.dataset, idx, min(p.length, cap), p.tiles, p.n_supervised))
        except (chat.BadSample, ImageProblem) as exc:
            if strict:
                raise RecipeError([f"{rec.where}: bad sample ({exc.reason}): {exc.detail} "
                                   "(set data.on_bad_sample=skip to count and skip such samples)"])
            cat.drop(exc.reason, rec.where, exc.detail)
    return cat


def _segments(processor, cat: Catalog, rec: sources.Record) -> list[chat.Segment]:
    msgs, paths = chat.messages(rec.data, cat.datasets[rec.dataset].image_root)
    return chat.segments(processor, msgs, paths)


def _max_tiles(recipe: Recipe, cat: Catalog, rec: sources.Record) -> int:
    return cat.datasets[rec.dataset].max_dynamic_patch or recipe.data.max_tiles_per_image


class PackPlan:
    """The global sequence of packs over epochs; pack j of epoch e is fixed by (seed, e)."""

    def __init__(self, recipe: Recipe, catalog: Catalog):
        if not catalog.samples:
            raise RecipeError(["data.datasets: no usable sample (dropped: "
                               + ", ".join(f"{k}={v}" for k, v in catalog.dropped.items()) + ")"])
        self.recipe, self.catalog = recipe, catalog
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            order = list(range(len(self.catalog.samples)))
            random.Random(f"{self.recipe.train.seed}:{e}").shuffle(order)
            self._epochs[e] = [[order[i] for i in p] for p in self._pack(order)]
        return self._epochs[e]

    def _pack(self, order: list[int]) -> list[list[int]]:
        cfg = self.recipe.data.packing
        s = self.catalog.samples
        lengths = [s[i].length for i in order]
        if not cfg.enabled:
            return [[i] for i in range(len(order))]
        from . import packing

        tiles = [s[i].tiles for i in order]
        return list(packing.pack(
            lengths, tiles, packing.Limits(cfg.max_packed_tokens, cfg.num_images_expected),
            strategy=cfg.strategy, window=cfg.window, max_open=cfg.max_buffer_size,
            min_active_tokens_ratio=cfg.min_active_tokens_ratio,
            allow_overflow=cfg.allow_overflow, strict_mode=cfg.strict_mode))

    def packs(self, start: int, count: int) -> list[list[int]]:
        """Global packs [start, start+count), crossing epoch boundaries."""
        out, e, base, j = [], 0, 0, start
        while len(out) < count:
            ep = self.epoch(e)
            if j < base + len(ep):
                out.append(ep[j - base])
                j += 1
            else:
                base, e = base + len(ep), e + 1
        return out

    def step(self, k: int, world: int) -> list[list[int]]:
        t = self.recipe.train
        return self.packs(k * t.micro_batch_size * t.grad_accum_steps * world,
                          t.micro_batch_size * t.grad_accum_steps * world)


def deal(step_packs: list[list[int]], rank: int, world: int, micro_batch_size: int) -> list[list[list[int]]]:
    """This rank's micro-batches (each a list of packs): pack j goes to rank j % world."""
    mine = step_packs[rank::world]
    return [mine[i: i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


class Materializer:
    """Encodes samples (decodes images) and lays packs out as training tensors."""

    def __init__(self, recipe: Recipe, catalog: Catalog, processor):
        self.recipe, self.catalog, self.processor = recipe, catalog, processor
        self.image_ids = set(chat._special_image_ids(processor))

    def sample(self, ref: SampleRef) -> chat.Encoded | None:
        rec = self.catalog.records[ref.record]
        try:
            enc = chat.encode(self.processor, _segments(self.processor, self.catalog, rec),
                              _max_tiles(self.recipe, self.catalog, rec))
        except (chat.BadSample, ImageProblem) as exc:  # e.g. a header that decodes badly
            self.catalog.drop(exc.reason, rec.where, exc.detail)
            return None
        if len(enc.input_ids) > ref.length:
            enc = chat.truncate(enc, ref.length, self.image_ids)
            if enc is None:
                self.catalog.drop("too_long", rec.where, "no text boundary to truncate at")
        return enc

    def micro_batch(self, packs: list[list[int]]) -> dict:
        """Packs laid end to end in one row. Labels are shifted here, per sample: labels[t] is
        the target of the prediction at t, and the last token of a sample has none."""
        ids, pos, sid, lab, lw, pix = [], [], [], [], [], []
        n = 0
        for pack in packs:
            for i in pack:
                ref = self.catalog.samples[i]
                enc = self.sample(ref)
                if enc is None:
                    continue
                L = len(enc.input_ids)
                ids += enc.input_ids
                pos += range(L)
                sid += [n] * L
                lab += enc.labels[1:] + [IGNORE]
                lw += [self.catalog.datasets[ref.dataset].loss_weight] * L
                if enc.pixel_values is not None:
                    pix.append(enc.pixel_values)
                n += 1
        if not ids:  # every sample of this micro-batch went bad: one pad token, weight 0,
            ids, pos, sid, lab, lw = [self.processor.tokenizer.pad_token_id], [0], [0], [IGNORE], [0.0]
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)[None]  # noqa: E731
        return {"input_ids": t(ids), "position_ids": t(pos), "sample_ids": t(sid), "labels": t(lab),
                "loss_weight": t(lw, torch.float32),
                "pixel_values": torch.cat(pix) if pix else None, "num_samples": n}
