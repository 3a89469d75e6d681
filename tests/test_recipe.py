"""Recipes: every shipped recipe validates; each kind of mistake gets one clear line, exit 2."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vlmft import recipe as R

from .conftest import DEMO, ROOT, vlmft

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, in_root):
    r = R.load(path)
    assert r.data.datasets and r.model.name_or_path


def test_overrides_merge(in_root):
    r = R.load(DEMO, ["train.max_steps=7", "optim.lr=1e-4", "optim.lr_multipliers={'*proj*': 2.0}"])
    assert r.train.max_steps == 7 and r.optim.lr == 1e-4
    assert r.optim.lr_multipliers == {"*proj*": 2.0}
    assert r.model.name_or_path == "demo/model"  # untouched keys keep the file's values


def test_every_field_has_help_text():
    import dataclasses

    def walk(cls):
        docs = R.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                walk(f.type)

    import typing
    for cls in (R.Recipe, R.ModelConfig, R.DataConfig, R.DatasetConfig, R.PackingConfig, R.LossConfig,
                R.OptimConfig, R.LayerDecayConfig, R.FreezeConfig, R.ScheduleConfig, R.TrainConfig,
                R.EngineConfig, R.CheckpointConfig, R.LogConfig):
        walk(cls)
    assert typing.get_type_hints(R.Recipe)


def test_all_errors_are_collected_with_lines(tmp_path, in_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("max_steps:", "max_stpes:")
                   .replace("zero_stage: 2", "zero_stage: 5")
                   .replace("lr: 1.0e-3", "lr: fast"))
    with pytest.raises(R.RecipeError) as e:
        R.load(bad)
    errs = e.value.errors
    assert len(errs) == 3, errs
    text = "\n".join(errs)
    assert "train.max_stpes: unknown key; did you mean 'max_steps'?" in text
    assert "engine.zero_stage: 5 is not one of 0, 1, 2, 3" in text
    assert "optim.lr: expected a number, got 'fast'" in text
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "max_stpes" in l)
    assert f"{bad}:{line}: train.max_stpes" in text


@pytest.mark.parametrize("override, message", [
    ("optim.betaz=[0.9,0.95]", "optim.betaz: unknown key; did you mean 'betas'?"),
    ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
    ("loss.reduction=mean", "loss.reduction: 'mean' is not one of token, sample, square"),
    ("data.datasets=[{path: nope.jsonl}]", "data.datasets[0].path: file 'nope.jsonl' not found"),
    ("model.name_or_path=./no/such/folder", "model.name_or_path: folder './no/such/folder' not found"),
    ("engine.deepspeed={optimizer: {type: AdamW}}", "engine.deepspeed.optimizer: vlmft builds the optimizer"),
])
def test_cli_bad_recipe_one_line_exit_2(override, message):
    t = time.perf_counter()
    p = vlmft("train", str(DEMO), override)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert time.perf_counter() - t < 10  # the process start; validation itself is below


def test_validation_imports_no_torch_and_is_fast():
    code = ("import sys, time; t = time.perf_counter(); from vlmft import recipe, cli; "
            "recipe.load('recipes/demo.yaml', ['train.max_steps=3']); "
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'heavy import'; "
            "print(time.perf_counter() - t)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) < 2.0


def test_validation_does_not_import_the_recipe_module():
    """recipe.py imports validation.py, never the other way round (no cycle, not even for types)."""
    import ast

    tree = ast.parse((ROOT / "vlmft" / "validation.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and "recipe" in m}, imported
    p = subprocess.run([sys.executable, "-c", "import sys, vlmft.validation; print('vlmft.recipe' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.strip() == "False", p.stderr
