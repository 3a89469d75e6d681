"""LoRA training in process (1 rank, DeepSpeed ZeRO-2 on the CPU): what trains, what stays
bit-identical, the two exported folders, gradient checkpointing with adapters, and a bad glob
refused before any weight is read. References: the demo model's own weights on disk, peft's own
loading of the adapter folder onto the base model, transformers' loading of the merged one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmft.recipe import RecipeError, load

from .conftest import DEMO, ROOT

BASE = ROOT / "demo" / "model"
STEPS = ["train.max_steps=2", "engine.zero_stage=2", "optim.lr=1e-2", "schedule.warmup_steps=0"]


def _stock(name: str) -> str:
    """A wrapped parameter's stock name (the reference names come from the base model)."""
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _train(out, *extra):
    from vlmft.train import train

    return train(load(DEMO, [f"output_dir={out}", *STEPS, "lora.enabled=true", *extra]))


def _base_state():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(BASE)).state_dict()


def _inputs(processor):
    from PIL import Image

    x = processor(text=["<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n"],
                  images=[Image.linear_gradient("L").resize((56, 56)).convert("RGB")], return_tensors="pt")
    x.pop("attention_mask")
    return {**x, "use_cache": False}


@pytest.fixture(scope="module")
def language_only(tmp_path_factory):
    """A LoRA run with the defaults (adapters on every nn.Linear of the language model)."""
    import os

    from vlmft.distributed import setup_environment

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup_environment()
        out = tmp_path_factory.mktemp("lora-language")
        return out, _train(out)
    finally:
        os.chdir(cwd)


def test_language_lora_leaves_every_other_weight_bit_identical(language_only):
    out, result = language_only
    base = _base_state()
    trained = dict(result.model.named_parameters())
    adapters = {n: p for n, p in trained.items() if ".lora_" in n}
    assert len(adapters) == 28
    assert all(float(p.detach().abs().max()) > 0 for n, p in adapters.items() if ".lora_B." in n)  # B started at 0
    for n, p in trained.items():
        if ".lora_" not in n:
            assert torch.equal(p, base[_stock(n)]), n  # vision, projector, norms, embeddings, head, bases
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(str(out / "final")).state_dict()
    kept = [k for k in final if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert len(kept) == sum(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in base)
    for k in kept:  # the merged folder too
        assert torch.equal(final[k], base[k]), k


def test_merged_final_equals_the_base_model_with_the_adapter(language_only, processor):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out, result = language_only
    inputs = _inputs(processor)
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(str(out / "final")).eval()(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(str(BASE))
        adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(**inputs).logits
        trained = result.model.eval()(**inputs).logits
        plain = AutoModelForImageTextToText.from_pretrained(str(BASE)).eval()(**inputs).logits
    assert (merged - adapted).abs().max() <= 1e-5
    assert (trained - adapted).abs().max() <= 1e-5
    assert (plain - adapted).abs().max() > 1e-3  # the adapters changed the model
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "demo/model"
    assert len(cfg["target_modules"]) == 14 and cfg["modules_to_save"] is None
    for folder in ("final", "adapter"):  # the processor and chat template training used
        assert (out / folder / "chat_template.jinja").read_text() == (BASE / "chat_template.jinja").read_text()
        assert (out / folder / "tokenizer.json").is_file() and (out / folder / "processor_config.json").is_file()
    gen = json.loads((out / "final" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in eos


def test_modules_to_save_projector_trains_the_projector_fully(in_root, tmp_path, dist_env):
    from transformers import AutoModelForImageTextToText

    result = _train(tmp_path, "lora.modules_to_save=[projector]")
    base = _base_state()
    trained = dict(result.model.named_parameters())
    copies = {n: p for n, p in trained.items() if ".modules_to_save.default." in n}
    assert len(copies) == 4  # linear_1, linear_2: weight and bias each
    # LLaVA-NeXT's image_newline is a parameter of the model itself, not a module peft can save:
    # it stays as loaded (README, LoRA)
    assert not trained["model.image_newline"].requires_grad
    for n, p in copies.items():
        assert not torch.equal(p, base[_stock(n)]), n  # every projector tensor trained
        original = trained[n.replace(".modules_to_save.default.", ".original_module.")]
        assert torch.equal(original, base[_stock(n)])  # the frozen original did not move
    final = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final")).state_dict()
    for n, p in copies.items():
        assert torch.equal(final[_stock(n)], p.detach()), n  # the merged folder holds the trained copy
    for k, v in final.items():
        if k.startswith("model.vision_tower."):
            assert torch.equal(v, base[k]), k
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(".multi_modal_projector." in k for k in adapter) == 4


def test_gradient_checkpointing_with_adapters_changes_nothing(in_root, tmp_path, dist_env):
    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    plain = _train(tmp_path / "a")
    ckpt = _train(tmp_path / "b", "model.gradient_checkpointing=both")
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "a"), losses(tmp_path / "b"))) <= 1e-6
    pa, pb = (dict(r.model.named_parameters()) for r in (plain, ckpt))
    assert max(float((pa[n] - pb[n]).abs().max()) for n in pa if ".lora_" in n) <= 1e-6
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())


def test_a_bad_glob_is_refused_before_the_weights_load(in_root, tmp_path, dist_env, monkeypatch):
    from vlmft import train as trainmod

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the lora section was checked")

    monkeypatch.setattr(trainmod, "load_model", no_weights)
    with pytest.raises(RecipeError) as e:
        _train(tmp_path, "lora.targets.vision=[patch_embedding]")
    assert e.value.errors == ["lora.targets.vision[0]: 'patch_embedding' matches "
                              "model.vision_tower.embeddings.patch_embedding (Conv2d); LoRA adapters "
                              "wrap nn.Linear layers only: narrow the glob, or train the layer fully with "
                              "lora.modules_to_save"]
