"""The catalog: every record read, planned without decoding pixels, or dropped and counted.

Planning a sample costs its chat template and tokenization plus one header read per image;
the packer needs only (length, tiles), so a pack plan never waits on image decoding.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..recipe import Recipe, RecipeError
from . import chat, sources
from .images import ImageProblem

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
            p = chat.plan(processor, segments(processor, cat, rec), max_tiles(recipe, cat, rec))
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


def segments(processor, cat: Catalog, rec: sources.Record) -> list[chat.Segment]:
    msgs, paths = chat.messages(rec.data, cat.datasets[rec.dataset].image_root)
    return chat.segments(processor, msgs, paths)


def max_tiles(recipe: Recipe, cat: Catalog, rec: sources.Record) -> int:
    return cat.datasets[rec.dataset].max_dynamic_patch or recipe.data.max_tiles_per_image
