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

import torch

from ..recipe import Recipe, RecipeError
from . import chat
from .catalog import Catalog, SampleRef, max_tiles, segments
from .images import ImageProblem

IGNORE = -100


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
            enc = chat.encode(self.processor, segments(self.processor, self.catalog, rec),
                              max_tiles(self.recipe, self.catalog, rec))
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
