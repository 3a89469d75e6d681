"""train.epochs: the steps that pass over every sample, computed from the plan, shown at start."""

from __future__ import annotations

import math

import pytest

from vlmft import recipe as R
from vlmft.data import epochs
from vlmft.data.catalog import build_catalog
from vlmft.data.stream import PackPlan
from vlmft.resume import compare

from .conftest import DEMO


def _epoch_recipe(tmp_path, *over):
    src = DEMO.read_text().replace("  max_steps: 800\n", "  epochs: 1\n")
    path = tmp_path / "r.yaml"
    path.write_text(src)
    return R.load(path, list(over))


def test_an_epochs_recipe_loads_with_max_steps_from_the_data(tmp_path, in_root):
    r = _epoch_recipe(tmp_path)
    assert (r.train.epochs, r.train.max_steps) == (1.0, 0)
    with pytest.raises(R.RecipeError, match="set either train.max_steps or train.epochs, not both"):
        _epoch_recipe(tmp_path, "train.max_steps=5")
    with pytest.raises(R.RecipeError, match="train.epochs: must be >= 0"):
        R.load(DEMO, ["train.epochs=-1", "train.max_steps=0"])


@pytest.mark.parametrize("e, mbs, gas, world", [(1, 1, 2, 1), (0.5, 2, 1, 3), (2.5, 1, 1, 2)])
def test_without_packing_an_epoch_is_one_step_per_global_batch_of_samples(tmp_path, in_root, processor,
                                                                          e, mbs, gas, world):
    r = _epoch_recipe(tmp_path, f"train.epochs={e}", "data.packing.enabled=false",
                      f"train.micro_batch_size={mbs}", f"train.grad_accum_steps={gas}")
    cat = build_catalog(r, processor)
    steps, _, batch = epochs.steps_for(r, cat, world)
    assert batch == mbs * gas * world
    assert steps == math.ceil(e * 480 / batch)                  # by hand: 480 samples, one a row


def test_one_epoch_of_packed_steps_sees_every_sample(tmp_path, in_root, processor):
    r = _epoch_recipe(tmp_path)
    cat = build_catalog(r, processor)
    resolved, note = epochs.resolve(r, cat, world=1)
    steps = resolved.train.max_steps
    assert resolved.train.epochs == 0 and note.startswith(f"vlmft: train.epochs=1 -> {steps} steps")
    plan = PackPlan(resolved, cat)
    seen = [{i for p in plan.step(k, 1) for i in p} for k in range(steps)]
    assert set().union(*seen) == set(range(len(cat.samples)))   # every sample in the epoch's steps
    assert set().union(*seen[:-1]) != set(range(len(cat.samples)))  # and one step fewer misses some


def test_an_epochs_run_trains_the_computed_steps(tmp_path, in_root, dist_env):
    from vlmft.train import train

    r = _epoch_recipe(tmp_path, "train.epochs=0.05", f"output_dir={tmp_path / 'run'}")
    result = train(r)
    steps = math.ceil(0.05 * len(PackPlan(r, _catalog(r)).round(0).packs) / 2)
    assert result.steps == steps
    saved = R.load(tmp_path / "run" / "recipe.yaml")           # the recipe as it ran reloads
    assert (saved.train.max_steps, saved.train.epochs) == (steps, 0.0)
    warnings, refusals = compare(R.to_dict(saved), R.to_dict(r), 1, 1)
    assert not warnings and not refusals                        # resuming the epochs recipe


def _catalog(r):
    from vlmft.model import load_processor

    return build_catalog(r, load_processor(r.model))


def test_lr_table_of_an_epochs_recipe_asks_for_the_steps(tmp_path, in_root):
    from typer.testing import CliRunner

    from vlmft.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(DEMO.read_text().replace("  max_steps: 800\n", "  epochs: 1\n"))
    r = CliRunner().invoke(app, ["lr-table", str(path)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "add train.epochs=0 train.max_steps=N" in r.stderr
    assert CliRunner().invoke(app, ["lr-table", str(path), "train.epochs=0", "train.max_steps=9"]).exit_code == 0
