"""A learnable visual task generated here: "What color is this?" about a solid image of one of
six colours (each image's shade jittered), answered "Red." etc. The demo model trains on 240
such images; `vlmft eval` asks 30 held-out ones, before and after training.

Measured 2026-11-30 (80 steps at lr 3e-3, 35 s on 2 shared cores): the trained model answers 26
of the 30 held-out questions exactly (exact match 0.87; the base model 0.00); its loss rises
from 0.25 to 0.76 when the images are blanked (visual gap 0.51, twice its loss), while the base
model's gap is 0.054, 0.9% of its loss of 5.90: it does not read the images."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from vlmft.cli import app
from vlmft.demo_assets import COLORS
from vlmft.recipe import load

from .conftest import DEMO


def colour_set(root, name: str, n: int, seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLORS))
        rgb = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLORS[colour])
        Image.new("RGB", (28, 28), rgb).save(root / "images" / f"{name}{i}.png")
        rows.append({"id": i, "image": f"images/{name}{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is this?"},
            {"from": "gpt", "value": colour.capitalize() + "."}]})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_json(recipe_path, *args) -> dict:
    result = CliRunner().invoke(app, ["eval", str(recipe_path), "--json", *args])
    assert result.exit_code == 0, result.output[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["datasets"]["heldout"]


def test_trained_model_reads_the_images_and_the_base_model_does_not(tmp_path, in_root, dist_env):
    from vlmft.recipe import to_yaml
    from vlmft.train import train

    over = [f"output_dir={tmp_path}/run", f"data.datasets=[{{path: '{colour_set(tmp_path, 'train', 240, 0)}'}}]",
            f"data.eval=[{{path: '{colour_set(tmp_path, 'heldout', 30, 1)}'}}]", "train.max_steps=80",
            "optim.lr=3e-3"]
    recipe = load(DEMO, over)
    path = tmp_path / "recipe.yaml"
    path.write_text(to_yaml(recipe))
    base = eval_json(path)
    train(recipe)
    trained = eval_json(path, "--model", f"{tmp_path}/run/final")
    print(f"base: {base}\ntrained: {trained}")
    assert base["samples"] == trained["samples"] == trained["answered"] == 30
    assert base["exact_match"] <= 0.2 and trained["exact_match"] >= 0.8
    # the gap against the model's own loss: ~1% for the base model, more than the loss itself once trained
    assert abs(base["visual_gap"]) < 0.02 * base["loss"]
    assert trained["visual_gap"] > 0.3 and trained["visual_gap"] > trained["loss"]
    assert trained["loss"] < base["loss"] - 2
