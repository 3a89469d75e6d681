"""Every shipped recipe with a config-only model folder (all of recipes/ but demo.yaml) runs
``lr_table`` offline on the meta device: every parameter lands in a tower, something trains,
and the model built from the folder's config.json has the size of the real checkpoint.

The sizes are the published ones, not counts from this code: the checkpoints' safetensors
totals (bytes / bytes per parameter) or the model cards. A config with a wrong hidden size,
layer count or vocabulary is off by more than the 5 % allowed.
"""

from __future__ import annotations

import pytest

from .conftest import ROOT
from vlmft.lr_table import lr_table
from vlmft.recipe import load

# recipe stem -> the real checkpoint's parameter count, in billions
PUBLISHED_SIZE_B = {
    "qwen2_5-vl-72b": 73.4,      # Qwen/Qwen2.5-VL-72B-Instruct
    "internvl2_5-78b": 78.4,     # OpenGVLab/InternVL2_5-78B
    "qwen2_5-vl-7b": 8.29,       # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen3-vl-8b": 8.77,         # Qwen/Qwen3-VL-8B-Instruct
    "internvl3-8b": 7.94,        # OpenGVLab/InternVL3-8B-hf: 15.89 GB of bf16 shards
    "llava-onevision-7b": 8.03,  # llava-hf/llava-onevision-qwen2-7b-ov-hf: 16.06 GB of bf16 shards
    "smolvlm2-2.2b": 2.25,       # HuggingFaceTB/SmolVLM2-2.2B-Instruct: 8.99 GB of fp32 shards
    "gemma-3-4b": 4.3,           # google/gemma-3-4b-it
}
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem != "demo")


def test_every_recipe_has_a_published_size():
    assert RECIPES == sorted(PUBLISHED_SIZE_B)


@pytest.mark.parametrize("name", RECIPES)
def test_lr_table_places_every_parameter_at_the_published_size(name, in_root):
    table = lr_table(load(f"recipes/{name}.yaml"), by="param")
    rows, totals = table["rows"], table["totals"]
    assert rows and all(r["tower"] in ("vision", "projector", "language", "head") for r in rows)
    assert {r["tower"] for r in rows} >= {"vision", "projector", "language"}
    assert totals["trainable"] > 0
    assert totals["total"] == sum(r["numel"] for r in rows)
    assert totals["total"] / 1e9 == pytest.approx(PUBLISHED_SIZE_B[name], rel=0.05)
