"""``train.epochs``: the run's length in optimizer steps, from the pack plan.

An epoch is one pass over every dataset's samples x repeat_time (the catalog's usable samples,
as the mixture draws them: under the default ``data.round_size`` a round of the plan is an
epoch). Its packs are counted on the plan's first round (scaled by samples per epoch / samples
per round when ``data.round_size`` differs), and

    steps = ceil(epochs x packs per epoch / global batch),  global batch = micro_batch_size x
                                                           grad_accum_steps x world size packs.

Later rounds reshuffle and may pack a few more or fewer packs, so an epoch's boundary can fall
a step away from a step boundary.
"""

from __future__ import annotations

import dataclasses
import math

from ..recipe import Recipe
from .catalog import Catalog


def steps_for(recipe: Recipe, catalog: Catalog, world: int) -> tuple[int, float, int]:
    """(steps, packs per epoch, global batch) for ``recipe.train.epochs`` on ``world`` ranks."""
    from .stream import PackPlan

    t = recipe.train
    batch = t.micro_batch_size * t.grad_accum_steps * world
    first = PackPlan(recipe, catalog, global_batch=batch).round(0)
    per_epoch = len(first.packs) * len(catalog.samples) / max(1, int(first.quotas.sum()))
    return max(1, math.ceil(t.epochs * per_epoch / batch - 1e-9)), per_epoch, batch


def resolve(recipe: Recipe, catalog: Catalog, world: int) -> tuple[Recipe, str | None]:
    """The recipe to train with: unchanged without ``train.epochs``, else with max_steps set
    from it (and epochs 0, so the saved recipe.yaml reloads as it ran), and a start-up note."""
    if not recipe.train.epochs > 0:
        return recipe, None
    steps, per_epoch, batch = steps_for(recipe, catalog, world)
    note = (f"vlmft: train.epochs={recipe.train.epochs:g} -> {steps} steps ({per_epoch:,.0f} packs "
            f"per epoch, {batch} packs per step)")
    train = dataclasses.replace(recipe.train, max_steps=steps, epochs=0.0)
    return dataclasses.replace(recipe, train=train), note
