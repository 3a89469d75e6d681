"""The evaluation data: the data.eval sets planned (or dropped and counted) like training data,
which training dataset each set measures, their packs and the packs' deal to ranks.

    data.eval entries --build_catalog (as training: drops by reason, file:line)--> catalog
      --packing.pack (the recipe's packer and limits, in record order)--> packs
    pack j -> rank j % world; each rank's packs cut into micro-batches of micro_batch_size

The packs depend on the data and the recipe only, never on the world size: every rank and every
world size evaluates the same rows, so sums over all ranks are the same figure whatever the
number of ranks. Every rank knows the whole plan, so the counts ZeRO-3 needs agreed (forward
calls, lm_head calls per micro-batch) are computed here without a collective.

The visual-reliance rows (:func:`rows`) hold the same tokens with each image's pixels replaced
by a blank image of the image's own size (from its header, as the planner sees it), so the
processor expands it to the same tokens and positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .data import drops, tokens
from .data.catalog import Catalog, build_catalog, max_tiles, segments
from .data.chat import BadSample
from .data.images import ImageProblem
from .data.stream import Materializer, packer_args, row
from .loss import chunks_needed
from .recipe import DatasetConfig, Recipe, RecipeError


@dataclass
class EvalData:
    catalog: Catalog
    names: list[str]                 # per eval dataset (catalog.datasets order)
    measures: list[str | None]       # the training dataset each set measures, or None
    packs: list[list[int]]           # catalog sample indices; every pack, in order

    def rank_packs(self, rank: int, world: int, micro_batch: int) -> list[list[list[int]]]:
        """This rank's micro-batches (each a list of packs)."""
        mine = self.packs[rank::world]
        return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]

    def micro_batches(self, world: int, micro_batch: int) -> int:
        """Forward calls every rank makes: the most micro-batches any rank has."""
        return -(-len(self.packs[0::world]) // micro_batch) if self.packs else 0

    def agreed(self, world: int, micro_batch: int, chunk_size: int) -> tuple[list[int], list[bool]]:
        """Per micro-batch index: lm_head calls (the most any rank needs) and whether any
        rank's micro-batch holds an image (the blank-image pass skips the others everywhere)."""
        n = self.micro_batches(world, micro_batch)
        chunks, images = [1] * n, [False] * n
        s = self.catalog.samples
        for r in range(world):
            for i, mb in enumerate(self.rank_packs(r, world, micro_batch)):
                sup = sum(s[j].n_supervised for p in mb for j in p)
                chunks[i] = max(chunks[i], chunks_needed(sup, chunk_size))
                images[i] = images[i] or any(s[j].num_images for p in mb for j in p)
        return chunks, images


def eval_recipe(recipe: Recipe) -> Recipe:
    """The recipe with data.eval as its datasets (what build_catalog reads)."""
    sets = [DatasetConfig(path=e.path, name=e.name, image_root=e.image_root) for e in recipe.data.eval]
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, datasets=sets))


def build(recipe: Recipe, processor, train_names: list[str]) -> EvalData:
    """Plan data.eval; RecipeError for a set that names no training dataset it could measure,
    duplicate names, or more bad samples than data.max_bad_fraction allows."""
    try:
        cat = build_catalog(eval_recipe(recipe), processor)
    except RecipeError as exc:   # a meta JSON's problems name the entry as a data.datasets one
        raise RecipeError([e.replace("data.datasets[", "data.eval[") for e in exc.errors]) from None
    names = [d.name for d in cat.datasets]
    owner = _entry_of(recipe, cat)
    measures, errors = [], []
    adaptive = recipe.data.adaptive != "none"
    for name, i in zip(names, owner):
        want = recipe.data.eval[i].measures or name
        if adaptive and recipe.data.eval[i].measures and want not in train_names:
            errors.append(f"data.eval[{i}].measures: '{want}' is not a training dataset "
                          f"(data.datasets: {', '.join(train_names)})")
        measures.append(want if want in train_names else None)
    if len(set(names)) < len(names):
        errors.append(f"data.eval: two sets share a name ({', '.join(names)}); give each a name")
    if adaptive:
        missing = [t for t in train_names if t not in measures]
        if missing:
            errors.append(f"data.adaptive: no data.eval set measures {', '.join(missing)}; add one "
                          f"with measures: {missing[0]}")
    errors += [f"data.eval: {e}" for e in drops.budget_errors(cat, recipe.data.max_bad_fraction)]
    if errors:
        raise RecipeError(errors)
    return EvalData(cat, names, measures, _packs(recipe, cat))


def _entry_of(recipe: Recipe, cat: Catalog) -> list[int]:
    """The data.eval entry each eval dataset came from (a meta JSON gives several)."""
    from .data.sources import expand

    out = []
    for i, e in enumerate(recipe.data.eval):
        out += [i] * len(expand([DatasetConfig(path=e.path, name=e.name, image_root=e.image_root)]))
    return out


def _packs(recipe: Recipe, cat: Catalog) -> list[list[int]]:
    from .data import packing

    if not cat.samples:
        return []
    if not recipe.data.packing.enabled:
        return [[i] for i in range(len(cat.samples))]
    limits, knobs = packer_args(recipe.data)
    if recipe.data.packing.strategy != "best_fit":
        knobs.pop("compute")
    lengths = [s.length for s in cat.samples]
    tiles = [s.tiles for s in cat.samples]
    return list(packing.pack(lengths, tiles if any(tiles) else None, limits,
                             strategy=recipe.data.packing.strategy, **knobs))


def drop_lines(cat: Catalog) -> list[str]:
    """The drop table of the eval sets (empty when nothing was dropped)."""
    lines = drops.table_lines(cat)
    return ["vlmft: evaluation data (data.eval):"] + lines if lines else []


def rows(mat: Materializer, packs: list[list[int]], blank: bool) -> tuple[dict, dict | None, list[int]]:
    """(row, the same row with blank images or None, bad samples per eval dataset). A sample
    that fails to load is counted (catalog.dropped and the list) and left out of both rows."""
    cat = mat.catalog
    encs, blanks, lw, ds = [], [], [], []
    bad = [0] * len(cat.datasets)
    mat.bad_log = []
    for pack in packs:
        for i in pack:
            ref = cat.samples[i]
            enc = mat.sample(ref)
            b = _blank(mat, ref, enc) if enc is not None and blank else enc
            if enc is None or b is None:
                bad[ref.dataset] += 1
                continue
            encs.append(enc)
            blanks.append(b)
            lw.append(1.0)
            ds.append(ref.dataset)
    if not encs:   # nothing (left) on this rank: one pad token of weight 0, like the loader's
        batch = mat.micro_batch([])
        return batch, (batch if blank else None), bad
    out = _row(mat, encs, lw, ds)
    return out, (_row(mat, blanks, lw, ds) if blank else None), bad


def _row(mat: Materializer, encs, lw, ds) -> dict:
    import torch

    batch = row(encs, lw, mat.family)
    batch.update(num_samples=len(encs), num_bad=0, sample_dataset=torch.tensor(ds, dtype=torch.long))
    return batch


def _blank(mat: Materializer, ref, enc: tokens.Encoded) -> tokens.Encoded | None:
    """``enc`` with every image's pixels those of a blank image of its size (None: the sample
    went bad, counted)."""
    if not enc.vision:
        return enc
    from .data import images as imageio
    from .models.base import blank_image

    rec = mat.catalog.records[ref.record]
    try:
        paths = [p for seg in segments(mat.processor, mat.catalog, rec) for p in seg.images]
        imgs = [blank_image(*imageio.size(p)) for p in paths]
        vision = mat.family.expand(mat.processor, imgs, max_tiles(mat.recipe, mat.catalog, rec)).vision
    except (BadSample, ImageProblem) as exc:
        mat._bad(exc.reason, rec.where, exc.detail)
        return None
    return dataclasses.replace(enc, vision=vision)
