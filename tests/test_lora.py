"""LoRA without training: the recipe section, which modules get adapters (resolved on the meta
model, per tower), how the optimizer plans the adapters' parameters, the peft options, the
merged and adapter exports of a wrapped model, and QLoRA's refusal without CUDA.

References are independent of vlmft/lora.py: hand counts from the configs, the plan of the
unwrapped model (an adapter must sit where the layer it wraps sits), peft's own loading."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

from vlmft import lora, optim
from vlmft.model import load_model, meta_model
from vlmft.recipe import RecipeError, load

from . import tiny_models
from .conftest import DEMO, ROOT, vlmft

LANG = "model.language_model.layers"
# the demo's text tower (demo/model/config.json): hidden 64, 2 kv heads x 16, MLP 128, 2 layers
DEMO_LINEARS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def recipe(*extra):
    return load(DEMO, ["lora.enabled=true", "output_dir=unused", *extra])


def wrapped(*extra, real=False):
    r = recipe(*extra)
    model = load_model(r.model) if real else meta_model(r.model)
    return r, lora.apply(model, r.lora)


def problems(*extra) -> list[str]:
    r = recipe(*extra)
    with pytest.raises(RecipeError) as e:
        lora.resolve(meta_model(r.model), r.lora)
    return e.value.errors


# ---------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("override, message", [
    ("lora.r=4", "lora.r: only used with lora.enabled=true"),
    ("lora.targets.vision=[linear]", "lora.targets: only used with lora.enabled=true"),
    ("lora.modules_to_save=[projector]", "lora.modules_to_save: only used with lora.enabled=true"),
])
def test_lora_knobs_without_lora_are_refused(override, message):
    with pytest.raises(RecipeError) as e:
        load(DEMO, [override])
    assert any(message in line for line in e.value.errors), e.value.errors


@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "lora.r: must be >= 1"),
    ("lora.alpha=0", "lora.alpha: must be > 0"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1)"),
    ("lora.init=orthogonal lora.r=3", "lora.init: orthogonal needs an even lora.r"),
    ("lora.init=pissa", "lora.init: 'pissa' is not one of default, gaussian, orthogonal"),
    ("lora.targets.language=[]", "lora.targets: no tower has targets"),
    ("lora.quantize=nf4", "lora.quantize: nf4 computes in bf16 or fp16"),
    ("lora.quantize=nf4 engine.precision=bf16 engine.zero_stage=3", "engine.zero_stage=2"),
])
def test_lora_values_are_checked(override, message):
    with pytest.raises(RecipeError) as e:
        load(DEMO, ["lora.enabled=true", *override.split()])
    assert any(message in line for line in e.value.errors), e.value.errors


# ---------------------------------------------------------------------------------- resolving


def test_default_targets_are_every_linear_of_the_language_tower_only():
    r = recipe()
    t = lora.resolve(meta_model(r.model), r.lora)
    want = [f"{LANG}.{i}.{p}.{n}" for i in range(2) for p, names in
            (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", ["gate_proj", "up_proj", "down_proj"]))
            for n in names]
    assert t.modules == {"language": want, "vision": [], "projector": []}
    assert t.saved == []


def test_a_glob_over_a_conv_layer_is_one_line_naming_it():
    errs = problems("lora.targets.vision=[patch_embedding]")
    assert errs == ["lora.targets.vision[0]: 'patch_embedding' matches "
                    "model.vision_tower.embeddings.patch_embedding (Conv2d); LoRA adapters wrap "
                    "nn.Linear layers only: narrow the glob, or train the layer fully with lora.modules_to_save"]


def test_cli_refuses_a_conv_glob_with_one_line_and_exit_2():
    p = vlmft("lr-table", str(DEMO), "lora.enabled=true", "lora.targets.vision=['*patch_embedding*']")
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Conv2d" in lines[0] and "embeddings.patch_embedding" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_globs_that_match_nothing_containers_or_norms_are_named():
    errs = problems("lora.targets.language=[fc1,self_attn,'*layernorm']")
    assert errs[0].startswith("lora.targets.language[0]: 'fc1' matches no module of the language tower; "
                              "it matches modules of the vision tower")
    assert errs[1].startswith("lora.targets.language[1]: 'self_attn' matches only containers")
    norms = [e for e in errs[2:] if "Qwen2RMSNorm" in e]
    assert len(norms) == 4 and len(errs) == 6  # input/post-attention norms of 2 layers, one line each


def test_a_language_glob_never_reaches_the_vision_tower():
    # q_proj/k_proj/v_proj exist in both towers of the demo model
    r = recipe("lora.targets.language=[q_proj,k_proj,v_proj]")
    t = lora.resolve(meta_model(r.model), r.lora)
    assert len(t.all()) == 6 and all(n.startswith(LANG) for n in t.all())


def test_qwen_conv3d_patch_embedding_and_merger_stay_out_of_vision_targets():
    """Qwen2.5-VL: 'linear' over the vision tower takes the blocks' layers, not the Conv3d patch
    embedding and not the merger (the projector); '*proj' there names the Conv3d."""
    r = load(None, [f"model.name_or_path={tiny_models.folder('qwen2_5_vl')}", f"data.datasets=[{{path: '{ROOT / 'demo' / 'data' / 'train.jsonl'}'}}]",
                    "lora.enabled=true", "lora.targets.vision=[linear]", "output_dir=unused"])
    model = meta_model(r.model)
    vision_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      and n.startswith("model.visual.blocks.")]
    t = lora.resolve(model, r.lora)
    assert t.modules["vision"] == vision_linears and vision_linears
    r.lora.targets.vision = ["*proj"]
    with pytest.raises(RecipeError) as e:
        lora.resolve(model, r.lora)
    assert e.value.errors == ["lora.targets.vision[0]: '*proj' matches model.visual.patch_embed.proj (Conv3d); "
                              "LoRA adapters wrap nn.Linear layers only: narrow the glob, or train the layer "
                              "fully with lora.modules_to_save"]


def test_modules_to_save_resolves_tower_names_and_refuses_overlaps():
    r = recipe("lora.modules_to_save=[projector,head]")
    assert lora.resolve(meta_model(r.model), r.lora).saved == ["model.multi_modal_projector", "lm_head"]
    errs = problems("lora.modules_to_save=['*layers.0.self_attn','*rotary_emb',nothing_here]")
    assert errs[0].startswith(f"lora.modules_to_save[0]: {LANG}.0.self_attn holds LoRA targets")
    assert errs[1] == "lora.modules_to_save[1]: '*rotary_emb' matches model.language_model.rotary_emb, which holds no parameter"
    assert errs[2].startswith("lora.modules_to_save[2]: 'nothing_here' matches no module")


def test_a_tied_head_cannot_be_saved():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = nn.Module()
            self.model.language_model.embed_tokens = nn.Embedding(10, 4)
            self.model.language_model.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    r = recipe("lora.modules_to_save=[head]")
    with pytest.raises(RecipeError) as e:
        lora.resolve(Tied(), r.lora)
    assert e.value.errors == ["lora.modules_to_save: lm_head shares its weight with "
                              "model.language_model.embed_tokens (tied); a trained copy would untie them: leave it out"]


# ---------------------------------------------------------------------------------- the optimizer plan


def _plain_rows(r):
    """The plan of the unwrapped model: where each layer's weight sits (the reference)."""
    rows, _ = optim.plan(meta_model(r.model), r.optim)
    return {row.name: row for row in rows}


def test_adapters_sit_where_their_layers_sit_and_only_they_train():
    r, model = wrapped("optim.layer_decay.language=0.5", "optim.layer_decay.vision=0.7")
    rows, groups = optim.plan(model, r.optim)
    plain = _plain_rows(r)
    adapters = [row for row in rows if row.lora == "adapter"]
    assert len(adapters) == 28  # 14 layers x (A, B)
    for row in adapters:
        layer_weight = row.name.split(".lora_")[0] + ".weight"
        ref = plain[layer_weight]
        assert (row.tower, row.layer_id, row.lr_scale) == (ref.tower, ref.layer_id, ref.lr_scale), row
        assert not row.frozen and row.weight_decay == r.optim.weight_decay  # matrices decay
    for row in rows:
        if row.lora != "adapter":
            assert row.frozen and row.reason.startswith("frozen: lora"), row
    for row in rows:  # every base weight is the unwrapped model's parameter, in the same place
        if row.lora == "base":
            ref = plain[row.name.replace(".base_layer.", ".")]
            assert (row.tower, row.layer_id) == (ref.tower, ref.layer_id)
    trainable = sum(r_.numel for r_ in rows if not r_.frozen)
    assert trainable == 2 * sum(8 * (i + o) for i, o in DEMO_LINEARS.values())  # hand count, r = 8


def test_peft_model_names_are_placed_like_the_wrapped_layers():
    """peft's PeftModel prefixes every name with base_model.model.: place() and the layer ids
    must not change (a plan over a PeftModel, as other tools hold it)."""
    from peft import get_peft_model

    r = recipe()
    t = lora.resolve(meta_model(r.model), r.lora)
    pm = get_peft_model(meta_model(r.model), lora.peft_config(r.lora, t), low_cpu_mem_usage=True)
    assert all(n.startswith("base_model.model.") for n, _ in pm.named_parameters())
    _, inner = wrapped()
    ours = {row.name: row for row in optim.plan(inner, r.optim)[0]}
    theirs = optim.plan(pm, r.optim)[0]
    assert len(theirs) == len(ours)
    for row in theirs:
        ref = ours[row.name.removeprefix("base_model.model.")]
        assert (row.tower, row.layer_id, row.frozen, row.lora) == (ref.tower, ref.layer_id, ref.frozen, ref.lora)
        assert optim.place(row.name)[0] == ref.tower


def test_lr_multipliers_and_no_decay_globs_reach_adapters():
    r, model = wrapped("optim.lr_multipliers={'*lora_B*': 16.0}", "optim.no_decay=['*lora_A*']")
    rows = {row.name: row for row in optim.plan(model, r.optim)[0]}
    for name, row in rows.items():
        if ".lora_B." in name:
            assert row.lr_scale == 16.0 and row.weight_decay > 0
        elif ".lora_A." in name:
            assert row.lr_scale == 1.0 and row.weight_decay == 0.0 and "optim.no_decay" in row.reason


def test_modules_to_save_train_fully_and_their_originals_stay_frozen():
    r, model = wrapped("lora.modules_to_save=[projector]")
    rows = optim.plan(model, r.optim)[0]
    saved = [row for row in rows if row.lora == "saved"]
    proj = [n for n, _ in meta_model(r.model).named_parameters() if n.startswith("model.multi_modal_projector.")]
    assert sorted(row.name.replace(".modules_to_save.default.", ".") for row in saved) == sorted(proj)
    assert all(not row.frozen and row.tower == "projector" for row in saved)
    assert {row.weight_decay for row in saved if row.name.endswith("bias")} == {0.0}
    originals = [row for row in rows if ".original_module." in row.name]
    assert len(originals) == len(proj) and all(row.frozen for row in originals)


def test_freeze_flags_still_act_on_adapters():
    r, model = wrapped("lora.targets.vision=[linear]", "optim.freeze.vision_first_layers=1")
    rows = [row for row in optim.plan(model, r.optim)[0] if row.lora == "adapter" and row.tower == "vision"]
    assert {(row.layer_id, row.frozen) for row in rows} == {(1, True), (2, False)}
    r, model = wrapped("optim.freeze.language=true")
    with pytest.raises(RecipeError) as e:
        optim.plan(model, r.optim)
    assert e.value.errors[0].startswith("optim.freeze.language: freezes the LoRA adapters in that tower")


# ---------------------------------------------------------------------------------- peft options


def _layer(model, name="self_attn.q_proj"):
    return model.get_submodule(f"{LANG}.0.{name}")


@pytest.mark.parametrize("extra, scaling", [([], 16 / 8), (["lora.alpha=4", "lora.r=4"], 1.0),
                                            (["lora.rslora=true"], 16 / math.sqrt(8))])
def test_alpha_r_and_rslora_set_the_scaling(extra, scaling):
    _, model = wrapped(*extra, real=True)
    layer = _layer(model)
    assert layer.scaling["default"] == pytest.approx(scaling)
    assert layer.lora_A["default"].weight.shape[0] == layer.lora_B["default"].weight.shape[1] == \
        int(dict(x.split("=") for x in extra).get("lora.r", 8))


def test_dropout_acts_on_the_adapter_input():
    _, model = wrapped("lora.dropout=0.25", real=True)
    assert _layer(model).lora_dropout["default"].p == 0.25
    _, model = wrapped(real=True)
    assert isinstance(_layer(model).lora_dropout["default"], nn.Identity)


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_init_choices_start_at_the_base_model_each_its_own_way(init):
    torch.manual_seed(0)
    _, model = wrapped(f"lora.init={init}", "lora.r=8", real=True)
    layer = _layer(model, "mlp.gate_proj")  # 64 -> 128
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if init == "default":  # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in); B zero
        assert a.abs().max() <= 1 / math.sqrt(64) and torch.count_nonzero(b) == 0
    elif init == "gaussian":  # normal, std 1/r; B zero
        assert a.std().item() == pytest.approx(1 / 8, rel=0.2) and a.abs().max() > 1 / math.sqrt(64)
        assert torch.count_nonzero(b) == 0
    else:  # A and B both non-zero, from orthogonal halves of one QR: B A = 0 up to rounding
        assert torch.count_nonzero(a) == a.numel() and torch.count_nonzero(b) == b.numel()
        assert (b @ a).abs().max() < 1e-6


# ---------------------------------------------------------------------------------- export


def test_merged_state_and_adapter_folder_match_the_wrapped_model(tmp_path, processor):
    """A wrapped demo model with random adapters and a changed projector copy: the merged folder
    (loaded by transformers) and the adapter folder (loaded by peft onto the base model) give
    the wrapped model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmft.export import merged_state, save_adapter, save_for_inference

    r, model = wrapped("lora.modules_to_save=[projector]", real=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    save_adapter(model, processor, str(tmp_path / "adapter"), state)
    save_for_inference(model, processor, str(tmp_path / "final"), merged_state(model, state))
    from PIL import Image

    x = processor(text=["a <image> b c d e f g h"], images=[Image.linear_gradient("L").resize((56, 28)).convert("RGB")],
                  return_tensors="pt")
    x.pop("attention_mask")
    base = AutoModelForImageTextToText.from_pretrained(str(ROOT / "demo" / "model"))
    with torch.no_grad():
        want = model(**x, use_cache=False).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final"))(**x, use_cache=False).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(**x, use_cache=False).logits
    assert (merged - want).abs().max() <= 1e-5 and (adapted - want).abs().max() <= 1e-5
    assert (want - AutoModelForImageTextToText.from_pretrained(str(ROOT / "demo" / "model"))(
        **x, use_cache=False).logits).abs().max() > 1e-2  # it moved
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["modules_to_save"]) == (8, 16.0, ["model.multi_modal_projector"])
    for folder in ("adapter", "final"):
        assert (tmp_path / folder / "chat_template.jinja").read_text() == processor.chat_template


# ---------------------------------------------------------------------------------- lr-table, QLoRA


def test_lr_table_on_qwen2_5_vl_72b_with_lora_in_under_30_s():
    t0 = time.perf_counter()
    p = vlmft("lr-table", str(ROOT / "recipes" / "qwen2_5-vl-72b.yaml"), "lora.enabled=true", "--json")
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    table = json.loads(p.stdout)
    config = json.loads((ROOT / "recipes" / "configs" / "qwen2_5-vl-72b" / "config.json").read_text())
    text = config.get("text_config", config)
    h, kv = text["hidden_size"], text["num_key_value_heads"] * (text["hidden_size"] // text["num_attention_heads"])
    m = text["intermediate_size"]
    per_layer = 8 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + m) + (m + h))  # q, k, v, o, gate, up, down
    adapters = [r for r in table["rows"] if r["lora"] == "adapter"]
    assert len(adapters) == 2 * 7 * text["num_hidden_layers"]
    assert all(r["tower"] == "language" and not r["frozen"] for r in adapters)
    assert table["totals"]["trainable"] == table["totals"]["adapters"] == per_layer * text["num_hidden_layers"]
    assert elapsed < 30, elapsed


def test_lr_table_marks_adapter_rows():
    from rich.console import Console

    from vlmft.lr_table import lr_table, render

    table = lr_table(recipe("lora.modules_to_save=[projector]"))
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(render(table, width=80))
    text = console.export_text()
    from safetensors.torch import load_file

    projector = sum(v.numel() for k, v in load_file(str(ROOT / "demo" / "model" / "model.safetensors")).items()
                    if k.startswith("multi_modal_projector."))   # the modules saved: the projector's
    assert f"LoRA r=8 alpha=16: adapters 16,384 in 14 layers; lora.modules_to_save {projector:,}" in " ".join(text.split())
    rows = [line.split() for line in text.splitlines() if "lora_B.default.weight" in line]
    assert len(rows) == 14 and all("adapter" in row for row in rows)
    assert max(len(line) for line in text.splitlines()) <= 80
    by_layer = lr_table(recipe(), by="layer")
    assert {r["name"]: r["adapters"] for r in by_layer["rows"] if r["adapters"]} == \
        {f"language[{i}]": sum(8 * (a + b) for a, b in DEMO_LINEARS.values()) for i in (1, 2)}


def test_qlora_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = load(DEMO, ["lora.enabled=true", "lora.quantize=nf4", "engine.precision=bf16", "output_dir=unused"])
    with pytest.raises(RecipeError) as e:
        lora.quantization(r.lora, r.engine.precision, None)
    assert e.value.errors == ["lora.quantize: nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels) and none is "
                              "visible; set lora.quantize=none to train LoRA on unquantized weights"]


def test_qlora_quantizes_the_language_model_only(monkeypatch):
    """What transformers is asked for when CUDA and bitsandbytes are there (this machine has
    neither: the 4-bit kernels themselves are not run by any test here)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    r = load(DEMO, ["lora.enabled=true", "lora.quantize=nf4", "engine.precision=bf16", "output_dir=unused",
                    "lora.modules_to_save=['*layers.1.mlp.up_proj']", "lora.targets.language=[q_proj]"])
    targets = lora.resolve(meta_model(r.model), r.lora)
    q = lora.quantization(r.lora, "bf16", targets)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == q.bnb_4bit_quant_storage == torch.bfloat16
    assert sorted(q.llm_int8_skip_modules) == sorted(["model.vision_tower", "model.multi_modal_projector", "lm_head",
                                                      f"{LANG}.1.mlp.up_proj"])
    r.lora.quantize = "none"
    assert lora.quantization(r.lora, "bf16", targets) is None


def test_merged_state_over_an_unquantized_base_equals_the_plain_merge():
    """QLoRA's merge takes the frozen weights from the base model loaded again (its own are
    4-bit): with the same base weights it is the plain merge, the trained copies included."""
    from vlmft.export import merged_state

    _, model = wrapped("lora.modules_to_save=[projector]", real=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    plain = merged_state(model, state)
    base = load_model(recipe().model).state_dict()
    over = merged_state(model, state, base)
    assert plain.keys() == over.keys() == base.keys()
    assert all(torch.equal(plain[k], over[k]) for k in plain)
    assert not torch.equal(over["model.multi_modal_projector.linear_1.weight"],
                           base["model.multi_modal_projector.linear_1.weight"])
