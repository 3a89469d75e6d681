"""Discoverable recipes and a readable lr-table: `vlmft recipe [SECTION]`, `vlmft recipe --init`,
lr-table at 80 columns, --step counted from 1 like training."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing

import pytest
from typer.testing import CliRunner

from vlmft import recipe as R
from vlmft.cli import app

from .conftest import BIN, DEMO, clean_env, run

runner = CliRunner()


def _leaf_keys(cls=R.Recipe, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _leaf_keys(typing.get_args(tp)[0], f"{prefix}{f.name}[].")
        else:
            yield prefix + f.name


def test_recipe_command_lists_every_key_with_default_and_help():
    out = runner.invoke(app, ["recipe"]).stdout
    for key in _leaf_keys():
        (line,) = [x for x in out.splitlines() if x.startswith(key + ": ")]
        assert "=" in line, line
    assert "optim.lr: float = 1.0e-05" in out
    assert "    Peak learning rate (AdamW)." in out
    assert "data.packing.strategy: str = best_fit  (best_fit | internvl | next_fit)" in out
    section = runner.invoke(app, ["recipe", "data.packing"]).stdout
    assert section.splitlines()[0] == "data.packing: section"
    assert all(x.startswith(("data.packing", "    ")) for x in section.splitlines())
    rows = json.loads(runner.invoke(app, ["recipe", "train", "--json"]).stdout)
    assert [r["key"] for r in rows] == ["train", "train.max_steps", "train.epochs",
                                        "train.micro_batch_size", "train.grad_accum_steps", "train.seed",
                                        "train.max_nonfinite_steps"]


def test_init_writes_a_recipe_that_loads_and_documents_every_key(tmp_path, in_root):
    text = runner.invoke(app, ["recipe", "--init"]).stdout
    path = tmp_path / "my.yaml"
    path.write_text(text)
    r = R.load(path)                                             # loads and validates as written
    assert r.data.datasets[0].path == "demo/data/train.jsonl"
    for key in _leaf_keys():
        name = key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*(# )?(- )?{name}: ", text, re.M), key
    # every commented key, uncommented, gives the defaults back: the comments are real YAML
    names = {k.rsplit(".", 1)[-1] for k in _leaf_keys()} | {"model", "data", "packing", "loss", "optim",
                                                           "layer_decay", "freeze", "schedule", "train",
                                                           "engine", "eval", "checkpoint", "log", "lora", "targets"}
    lines = [re.sub(r"^(\s*)# ((\w+):.*)$", lambda m: m.group(1) + m.group(2)
                    if m.group(3) in names else m.group(0), x) for x in text.splitlines()]
    full = tmp_path / "full.yaml"
    full.write_text("\n".join(lines) + "\n")
    uncommented = R.load(full)
    defaults = R.Recipe()
    defaults.data.datasets = [R.DatasetConfig(path="demo/data/train.jsonl")]
    defaults.data.eval = [R.EvalDatasetConfig(path="demo/data/eval.jsonl")]
    assert uncommented == defaults


def test_lr_table_fits_80_columns_and_shows_every_name_and_lr(in_root):
    from rich.console import Console

    from vlmft import lr_table as lt

    p = run([str(BIN / "vlmft"), "lr-table", str(DEMO)], env=clean_env(COLUMNS="80"))
    assert p.returncode == 0, p.stderr
    table = lt.lr_table(R.load(DEMO))
    lines = p.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    rows = [x for x in lines if re.match(r"^\S+\s+\S+\[\d+\]\s", x)]
    assert len(rows) == len(table["rows"])
    for line, want in zip(rows, table["rows"]):
        name, layer, lr, wd, group = line.split()
        assert name == want["name"] or (name.startswith("…") and want["name"].endswith(name[1:])
                                        and len(name) >= 16)
        assert float(lr) == pytest.approx(want["lr"], rel=5e-3)   # the whole number, never cut
        assert float(wd) == want["weight_decay"]
    wide = lt.render(table, wide=True)
    console = Console(width=lt.wide_width(wide), record=True, file=open(os.devnull, "w"))
    console.print(wide)
    text = console.export_text()
    for want in table["rows"]:
        assert want["name"] in text and want["module"] in text


def test_lr_table_step_1_is_the_first_optimizer_steps_lr(in_root):
    """Against torch's own LambdaLR over the same schedule: the lr of the first optimizer step
    is the group's lr before any scheduler.step(), of step k after k-1 of them."""
    from vlmft.lr_table import lr_table
    from vlmft.model import load_model
    from vlmft.optim import build_optimizer
    from vlmft.schedule import scheduler

    r = R.load(DEMO, ["schedule.warmup_steps=3", "train.max_steps=10"])
    opt, _ = build_optimizer(load_model(r.model), r.optim)
    sched = scheduler(opt, r.schedule, r.train.max_steps)
    for step in range(1, 11):
        groups = lr_table(r, step=step, by="group")["groups"]
        assert [g["lr"] for g in groups] == pytest.approx([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
