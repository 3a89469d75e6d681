"""End to end: `vlmft train` on the demo, in process and under torchrun with real DeepSpeed."""

from __future__ import annotations

import json

import pytest
import torch

from vlmft.recipe import load

from .conftest import DEMO, torchrun


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_exports_a_folder_that_reproduces_the_trained_logits(in_root, tmp_path, processor, dist_env):
    from transformers import AutoModelForImageTextToText

    from vlmft.train import train

    out = tmp_path / "run"
    recipe = load(DEMO, [f"output_dir={out}", "train.max_steps=6", "engine.zero_stage=2"])
    result = train(recipe)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(isinstance(r["loss"], float) for r in rows)
    assert all(r["model_flops"] > 0 and r["mfu"] is None for r in rows)   # MFU needs a known GPU peak
    loaded = AutoModelForImageTextToText.from_pretrained(result.final).eval()
    trained = result.model.eval()
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "processor_config.json").is_file()
    assert (out / "final" / "chat_template.jinja").is_file()
    from PIL import Image

    inputs = processor(text=["<|im_start|>user\n<image>\nWhat is two plus two?<|im_end|>\n"],
                       images=[Image.linear_gradient("L").resize((56, 56)).convert("RGB")], return_tensors="pt")
    inputs.pop("attention_mask")
    with torch.no_grad():
        a = trained(**inputs, use_cache=False).logits
        b = loaded(**inputs, use_cache=False).logits
    assert torch.equal(a, b)
    # and training moved the weights away from the initial folder
    initial = AutoModelForImageTextToText.from_pretrained(recipe.model.name_or_path)
    with torch.no_grad():
        c = initial(**inputs, use_cache=False).logits
    assert (a - c).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_run_with_deepspeed(tmp_path, zero):
    out = tmp_path / f"z{zero}"
    p = torchrun(2, "train", str(DEMO), f"output_dir={out}", "train.max_steps=4",
                 f"engine.zero_stage={zero}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file()
