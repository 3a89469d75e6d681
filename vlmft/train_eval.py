"""The training loop's evaluation hooks: the Evaluator and the adaptive dataset weights built
with the run, the weights put on each step's micro-batches, an evaluation at its steps.

    build:  setup()      data.eval planned before the weights load (bad eval data fails fast,
                         its drops printed like training's); AdaptiveWeights restored from the
                         checkpoint's state, so a resumed run continues with the same weights
    loop:   weigh()      before train_step: token loss weight = loss_weight x adaptive weight
            evaluate()   at eval.every_steps and after the last step, on every rank; the
                         held-out loss per training dataset updates the adaptive weights
"""

from __future__ import annotations

import sys

from . import per_dataset


def setup(recipe, processor, names: list[str], rank: int, world: int, saved: dict | None):
    """(Evaluator or None, AdaptiveWeights or None) for the run."""
    evaluator = adaptive = None
    if recipe.data.eval:
        from .eval import Evaluator
        from .eval_data import drop_lines

        evaluator = Evaluator(recipe, processor, names, rank, world)
        lines = drop_lines(evaluator.data.catalog)
        if rank == 0 and lines:
            print("\n".join(lines), file=sys.stderr)
    if recipe.data.adaptive != "none":
        from .data.adaptive import AdaptiveWeights

        adaptive = AdaptiveWeights.from_config(recipe.data, names)
        if saved and saved.get("adaptive"):
            adaptive.load_state_dict(saved["adaptive"])
    return evaluator, adaptive


def weigh(adaptive, datasets, batches: list[dict]) -> dict:
    """data.adaptive: each token's loss weight becomes d_i = loss_weight_i x w_i of its dataset
    (``datasets``: the catalog's); returns the weights used, for the step's metrics row."""
    if adaptive is None:
        return {}
    d = adaptive.apply({ds.name: ds.loss_weight for ds in datasets})
    per_dataset.weigh(batches, [d[ds.name] for ds in datasets])
    return {f"adaptive/{n}/weight": w for n, w in adaptive.weights.items()}


def evaluate(evaluator, adaptive, eng, model, step: int, zero3: bool, say) -> dict:
    """Evaluate data.eval on every rank (predictions filed under stepN), ``say`` its summary,
    update the adaptive weights from the held-out losses; returns the metrics row's eval keys."""
    from . import eval as evaluation

    result = evaluator.run(eng, model, f"step{step}", zero3=zero3, device=eng.device)
    say(evaluation.summary(result))
    if adaptive is not None:
        adaptive.update(evaluator.measured())
    return evaluation.metrics(result)
