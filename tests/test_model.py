"""Model loading options: gradient checkpointing per tower leaves gradients unchanged."""

from __future__ import annotations

import pytest
import torch

from vlmft.model import enable_gradient_checkpointing, load_model, load_processor
from vlmft.models import LlavaNext

from vlmft.recipe import ModelConfig

from .conftest import ROOT

CFG = ModelConfig(name_or_path=str(ROOT / "demo" / "model"))


def _grads(model):
    from PIL import Image

    proc = load_processor(CFG)
    img = Image.linear_gradient("L").resize((56, 28)).convert("RGB")  # deterministic
    inputs = proc(text=["a <image> b c d e f"], images=[img], return_tensors="pt")
    inputs.pop("attention_mask")
    out = model(**inputs, use_cache=False)
    out.logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which, towers", [("vision", ["vision_tower"]), ("language", ["language_model"]),
                                           ("both", ["vision_tower", "language_model"])])
def test_gradient_checkpointing_per_tower(which, towers):
    ref = _grads(load_model(CFG).train())
    model = load_model(CFG).train()
    assert enable_gradient_checkpointing(model, which, LlavaNext()) == towers
    for name, sub in model.model.named_children():
        on = [m for m in sub.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(on) == (name in towers), name
    got = _grads(model)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


def test_no_tower_found_is_a_clear_error():
    model = load_model(CFG)
    model.model.vision_tower_renamed = model.model.vision_tower
    del model.model.vision_tower
    with pytest.raises(ValueError, match="no vision tower found"):
        enable_gradient_checkpointing(model, "vision", LlavaNext())
