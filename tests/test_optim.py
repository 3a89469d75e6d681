"""Parameter groups (vlmft/optim.py) and lr-table (vlmft/lr_table.py) on tiny VLMs built from
configs on the meta device (no downloads, no weights, no deepspeed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmft.optim import ParamRow, apply_freeze, build_optimizer, check_groups, plan
from vlmft.recipe import FreezeConfig, LayerDecayConfig, OptimConfig, Recipe, RecipeError

from .optim_reference import describe_groups

ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14)
MROPE = {"type": "mrope", "mrope_section": [2, 1, 1]}


def _config(family: str, **kw):
    import transformers as tf

    if family == "internvl":
        return tf.InternVLConfig(vision_config=VISION, text_config=dict(model_type="qwen2", **TEXT), **kw)
    if family == "qwen2_vl":
        return tf.Qwen2VLConfig(vision_config=dict(depth=3, embed_dim=32, hidden_size=32, num_heads=4,
                                                   mlp_ratio=2),
                                text_config=dict(TEXT, rope_scaling=MROPE), **kw)
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(vision_config=dict(depth=3, hidden_size=32, out_hidden_size=32,
                                                      intermediate_size=64, num_heads=4,
                                                      fullatt_block_indexes=[2]),
                                   text_config=dict(TEXT, rope_scaling=MROPE), **kw)
    if family == "llava":
        return tf.LlavaConfig(vision_config=dict(VISION, model_type="clip_vision_model"),
                              text_config=dict(model_type="llama", **TEXT), **kw)
    if family == "idefics3":
        return tf.Idefics3Config(vision_config=VISION, text_config=dict(model_type="llama", **TEXT), **kw)
    if family == "smolvlm":
        return tf.SmolVLMConfig(vision_config=VISION, text_config=dict(model_type="llama", **TEXT), **kw)
    raise KeyError(family)


def tiny(family: str, **kw) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(_config(family, **kw))


FAMILIES = ["internvl", "qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "smolvlm"]
# tower roots of each family (vision, projector, language); lm_head is the head everywhere
ROOTS = {
    "internvl": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."),
    "qwen2_vl": ("model.visual.", "model.visual.merger.", "model.language_model."),
    "qwen2_5_vl": ("model.visual.", "model.visual.merger.", "model.language_model."),
    "llava": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."),
    "idefics3": ("model.vision_model.", "model.connector.", "model.text_model."),
    "smolvlm": ("model.vision_model.", "model.connector.", "model.text_model."),
}


def rows_by_name(rows: list[ParamRow]) -> dict[str, ParamRow]:
    return {r.name: r for r in rows}


# ---------------------------------------------------------------------------------------------
# No-decay and placement in every supported family


@pytest.mark.parametrize("family", FAMILIES)
def test_no_norm_bias_embedding_is_ever_decayed(family):
    model = tiny(family)
    modules = dict(model.named_modules())
    opt = OptimConfig(weight_decay=0.1, layer_decay=LayerDecayConfig(vision=0.8, language=0.9))
    rows, groups = plan(model, opt)
    params = dict(model.named_parameters())
    assert [r.name for r in rows] == list(params)
    decayed = [r for r in rows if r.weight_decay > 0]
    assert decayed, "some matrices must be decayed"
    for r in rows:
        owner = modules[r.name.rsplit(".", 1)[0]]
        is_norm = "Norm" in type(owner).__name__ or "norm" in r.name.rsplit(".", 1)[0].lower()
        if (is_norm or r.name.endswith(".bias") or params[r.name].ndim <= 1
                or isinstance(owner, nn.Embedding) or "embed" in r.name):
            assert r.weight_decay == 0.0, (r.name, r.reason)
        else:
            assert r.weight_decay == 0.1 and r.reason.startswith("decay"), (r.name, r.reason)
    vision, projector, language = ROOTS[family]
    for r in rows:
        want = ("projector" if r.name.startswith(projector) else "vision" if r.name.startswith(vision)
                else "language" if r.name.startswith(language) else "head")
        assert r.tower == want, (r.name, r.tower)
        assert r.layer_id is not None
    # the embedding matrix is language layer 0; blocks are i + 1
    embed = next(r for r in rows if "embed_tokens" in r.name)
    assert embed.layer_id == 0 and embed.weight_decay == 0.0
    assert all(r.layer_id == 1 for r in rows if f"{language}layers.0." in r.name)
    assert len(groups) == len({(round(g["lr_scale"], 12), g["weight_decay"]) for g in groups})


@pytest.mark.parametrize("family", FAMILIES)
def test_default_optim_gives_two_groups(family):
    rows, groups = plan(tiny(family), OptimConfig())
    assert [g["weight_decay"] for g in groups] in ([0.0, 0.05], [0.05, 0.0])
    assert sum(len(g["names"]) for g in groups) == len(rows)


def test_internvl_layer_table_by_hand():
    """3 vision blocks (top 4), 2 text blocks (top 3), vision 0.5, language 0.8, projector x10."""
    model = tiny("internvl", tie_word_embeddings=False)
    opt = OptimConfig(lr=1e-3, layer_decay=LayerDecayConfig(vision=0.5, language=0.8),
                      lr_multipliers={"*multi_modal_projector*": 10.0, "lm_head.*": 2.0})
    rows, groups = plan(model, opt)
    expected = [  # (name prefix, tower, layer_id, lr_scale)
        ("model.vision_tower.embeddings.", "vision", 0, 0.5 ** 4),
        ("model.vision_tower.encoder.layer.0.", "vision", 1, 0.5 ** 3),
        ("model.vision_tower.encoder.layer.1.", "vision", 2, 0.5 ** 2),
        ("model.vision_tower.encoder.layer.2.", "vision", 3, 0.5),
        ("model.multi_modal_projector.", "projector", 4, 10.0),
        ("model.language_model.embed_tokens.", "language", 0, 0.8 ** 3),
        ("model.language_model.layers.0.", "language", 1, 0.8 ** 2),
        ("model.language_model.layers.1.", "language", 2, 0.8),
        ("model.language_model.norm.", "language", 3, 1.0),
        ("lm_head.", "head", 3, 2.0),
    ]
    for r in rows:
        (prefix, tower, lid, scale), = [e for e in expected if r.name.startswith(e[0])]
        assert (r.tower, r.layer_id) == (tower, lid), r.name
        assert r.lr_scale == pytest.approx(scale), r.name
    by = rows_by_name(rows)
    assert by["model.vision_tower.embeddings.cls_token"].reason.startswith("no decay: class token")
    assert "position embedding" in by["model.vision_tower.embeddings.position_embeddings"].reason
    assert "layer scale" in by["model.vision_tower.encoder.layer.0.lambda_1"].reason
    assert by["lm_head.weight"].weight_decay == 0.05
    # 10 distinct scales (vision 4, projector 1, language 4 with norm at 1.0, head 2.0)
    assert len({round(r.lr_scale, 12) for r in rows}) == 10
    assert len(groups) <= 2 * 10
    optimizer, _ = build_optimizer(model, opt)
    for i, g in enumerate(optimizer.param_groups):
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["name"].startswith(f"g{i} ")


def test_multipliers_multiply_with_each_other():
    model = tiny("internvl")
    opt = OptimConfig(lr_multipliers={"model.multi_modal_projector.*": 10.0, "*linear_1*": 0.5})
    by = rows_by_name(plan(model, opt)[0])
    assert by["model.multi_modal_projector.linear_1.weight"].lr_scale == pytest.approx(5.0)
    assert by["model.multi_modal_projector.linear_2.weight"].lr_scale == pytest.approx(10.0)


def test_no_decay_globs_and_module_no_weight_decay():
    model = tiny("qwen2_5_vl")
    model.model.visual.no_weight_decay = lambda: {"blocks.0.attn.qkv.weight"}
    by = rows_by_name(plan(model, OptimConfig(no_decay=["lm_head.*"]))[0])
    assert by["lm_head.weight"].weight_decay == 0.0
    assert "optim.no_decay 'lm_head.*'" in by["lm_head.weight"].reason
    assert by["model.visual.blocks.0.attn.qkv.weight"].weight_decay == 0.0
    assert "no_weight_decay()" in by["model.visual.blocks.0.attn.qkv.weight"].reason
    assert by["model.visual.blocks.1.attn.qkv.weight"].weight_decay == 0.05


# ---------------------------------------------------------------------------------------------
# Freezing


def _trainable(model, freeze: FreezeConfig) -> dict[str, bool]:
    build_optimizer(model, OptimConfig(freeze=freeze))
    return {n: p.requires_grad for n, p in model.named_parameters()}


FREEZE_CASES = {  # flag -> predicate on the name of a parameter that must be frozen (InternVL)
    "vision": lambda n: n.startswith("model.vision_tower."),
    "projector": lambda n: n.startswith("model.multi_modal_projector."),
    "language": lambda n: n.startswith("model.language_model."),
    "lm_head": lambda n: n.startswith("lm_head."),
}


@pytest.mark.parametrize("flag", list(FREEZE_CASES))
def test_each_freeze_flag_freezes_exactly_its_part(flag):
    model = tiny("internvl", tie_word_embeddings=False)
    got = _trainable(model, FreezeConfig(**{flag: True}))
    assert any(got.values()) and not all(got.values())
    for n, trainable in got.items():
        assert trainable == (not FREEZE_CASES[flag](n)), n


def test_vision_first_and_last_layers():
    model = tiny("internvl", tie_word_embeddings=False)
    got = _trainable(model, FreezeConfig(vision_first_layers=1))
    frozen = {n for n, t in got.items() if not t}
    assert frozen == {n for n in got if n.startswith(("model.vision_tower.embeddings.",
                                                      "model.vision_tower.encoder.layer.0."))}
    got = _trainable(model, FreezeConfig(vision_last_layers=2))
    frozen = {n for n, t in got.items() if not t}
    assert frozen == {n for n in got if n.startswith(("model.vision_tower.encoder.layer.1.",
                                                      "model.vision_tower.encoder.layer.2."))}
    # Qwen2.5-VL: patch embedding + first block; the merger (projector) is not a block
    model = tiny("qwen2_5_vl")
    got = _trainable(model, FreezeConfig(vision_first_layers=3))
    frozen = {n for n, t in got.items() if not t}
    assert frozen == {n for n in got if n.startswith("model.visual.") and ".merger." not in n}
    # CLIP (LLaVA): the pre-block norm goes with the embeddings, the post-norm stays trainable
    model = tiny("llava")
    got = _trainable(model, FreezeConfig(vision_first_layers=1, vision_last_layers=1))
    assert not got["model.vision_tower.pre_layrnorm.weight"]
    assert got["model.vision_tower.encoder.layers.1.mlp.fc1.weight"]
    assert not got["model.vision_tower.encoder.layers.2.mlp.fc1.weight"]
    assert got["model.vision_tower.post_layernorm.weight"]


def test_freeze_more_vision_layers_than_exist_is_an_error():
    with pytest.raises(RecipeError, match=r"optim.freeze.vision_first_layers: 4, but the vision tower has 3"):
        plan(tiny("internvl"), OptimConfig(freeze=FreezeConfig(vision_first_layers=4)))


def test_tied_head_follows_the_input_embeddings():
    model = tiny("internvl")  # InternVLConfig ties lm_head to embed_tokens by default
    assert model.lm_head.weight is model.get_input_embeddings().weight
    rows, _ = plan(model, OptimConfig())
    assert "lm_head.weight" not in rows_by_name(rows)
    embed = rows_by_name(rows)["model.language_model.embed_tokens.weight"]
    assert "tied: also lm_head.weight" in embed.reason
    got = _trainable(model, FreezeConfig(language=True))
    assert not got["model.language_model.embed_tokens.weight"]
    with pytest.raises(RecipeError, match="optim.freeze.lm_head: .*tied"):
        plan(model, OptimConfig(freeze=FreezeConfig(lm_head=True)))
    # a pattern may name the head by its tied alias
    by = rows_by_name(plan(model, OptimConfig(lr_multipliers={"lm_head.weight": 3.0}))[0])
    assert by["model.language_model.embed_tokens.weight"].lr_scale == 3.0


def test_plan_does_not_touch_requires_grad_and_apply_freeze_is_reversible():
    model = tiny("qwen2_vl")
    rows, _ = plan(model, OptimConfig(freeze=FreezeConfig(vision=True)))
    assert all(p.requires_grad for p in model.parameters())
    apply_freeze(model, rows)
    assert not model.model.visual.blocks[0].attn.qkv.weight.requires_grad
    apply_freeze(model, plan(model, OptimConfig())[0])
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Invariants and errors


def test_every_trainable_parameter_in_exactly_one_group():
    model = tiny("internvl", tie_word_embeddings=False)
    opt = OptimConfig(layer_decay=LayerDecayConfig(0.7, 0.9), freeze=FreezeConfig(projector=True),
                      lr_multipliers={"*encoder.layer.2*": 3.0})
    optimizer, rows = build_optimizer(model, opt)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {r.name for r in rows if r.frozen}
    assert frozen and all(n.startswith("model.multi_modal_projector.") for n in frozen)
    assert all(r.group is None for r in rows if r.frozen)
    keys = [(g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups]
    assert len(keys) == len(set(keys))
    # the check itself catches a parameter in two groups or in none
    _, groups = plan(model, opt)
    groups[1]["names"].append(groups[0]["names"][0])
    with pytest.raises(AssertionError, match="is in groups 0 and 1"):
        check_groups(rows, groups)
    _, groups = plan(model, opt)
    groups[0]["names"].pop()
    with pytest.raises(AssertionError, match="not grouped"):
        check_groups(rows, groups)


def test_pattern_matching_nothing_names_the_key_and_suggests():
    model = tiny("internvl")
    with pytest.raises(RecipeError) as e:
        plan(model, OptimConfig(lr_multipliers={"*multimodal_projector*": 10.0},
                                no_decay=["model.vison_tower.*"]))
    msg = str(e.value)
    assert "optim.lr_multipliers.*multimodal_projector*: pattern matches no parameter" in msg
    assert "did you mean '*multi_modal_projector*'?" in msg
    assert "optim.no_decay[0]: pattern 'model.vison_tower.*' matches no parameter" in msg
    assert "did you mean 'model.vision_tower.*'?" in msg
    assert len(e.value.errors) == 2
    with pytest.raises(ValueError, match=r"optim.lr_multipliers.xyz.*names look like"):
        plan(model, OptimConfig(lr_multipliers={"xyz": 2.0}))


class RemoteCodeLike(nn.Module):
    """InternVL's own (trust_remote_code) layout: placed by the name fallback."""

    def __init__(self, extra: bool = False):
        super().__init__()
        lin = lambda: nn.Linear(4, 4)  # noqa: E731
        self.vision_model = nn.Module()
        self.vision_model.embeddings = nn.Module()
        self.vision_model.embeddings.class_embedding = nn.Parameter(torch.zeros(1, 1, 4))
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList([lin() for _ in range(2)])
        self.mlp1 = nn.Sequential(nn.LayerNorm(4), lin())
        self.language_model = nn.Module()
        self.language_model.model = nn.Module()
        self.language_model.model.embed_tokens = nn.Embedding(10, 4)
        self.language_model.model.h = nn.ModuleList([lin() for _ in range(3)])
        self.language_model.model.norm = nn.LayerNorm(4)
        self.language_model.lm_head = nn.Linear(4, 10, bias=False)
        if extra:
            self.logit_scale = nn.Parameter(torch.ones(()))


def test_fallback_from_module_names_and_unplaceable_error():
    rows, _ = plan(RemoteCodeLike(), OptimConfig(layer_decay=LayerDecayConfig(0.5, 0.5)))
    got = {r.name: (r.tower, r.layer_id) for r in rows}
    assert got["vision_model.embeddings.class_embedding"] == ("vision", 0)
    assert got["vision_model.encoder.layers.1.weight"] == ("vision", 2)
    assert got["mlp1.1.weight"] == ("projector", 3)
    assert got["language_model.model.embed_tokens.weight"] == ("language", 0)
    assert got["language_model.model.h.2.weight"] == ("language", 3)
    assert got["language_model.model.norm.weight"] == ("language", 4)
    assert got["language_model.lm_head.weight"] == ("head", 4)
    with pytest.raises(ValueError, match="logit_scale"):
        plan(RemoteCodeLike(extra=True), OptimConfig())


def test_describe_groups_matches_the_plan():
    """The shape a DeepSpeed-side test compares: engine.optimizer.param_groups vs lr-table."""
    from vlmft.lr_table import table_for_model

    recipe = Recipe()
    recipe.optim = OptimConfig(lr=2e-5, layer_decay=LayerDecayConfig(0.9, 1.0),
                               lr_multipliers={"model.multi_modal_projector.*": 10.0})
    model = tiny("internvl")
    optimizer, _ = build_optimizer(model, recipe.optim)
    got = describe_groups(optimizer)
    want = table_for_model(model, recipe, step=recipe.schedule.warmup_steps + 1, by="group")["groups"]
    assert [(g["name"], g["weight_decay"], g["numel"]) for g in got] == \
        [(g["name"], g["weight_decay"], g["numel"]) for g in want]
    assert [g["lr"] for g in got] == pytest.approx([g["lr"] for g in want])


# ---------------------------------------------------------------------------------------------
# lr-table


def test_lr_table_views_and_csv():
    from vlmft.lr_table import table_for_model, to_csv

    recipe = Recipe()
    recipe.optim = OptimConfig(lr=1e-4, layer_decay=LayerDecayConfig(0.5, 1.0),
                               freeze=FreezeConfig(vision_first_layers=1))
    recipe.schedule.warmup_steps = 10
    model = tiny("internvl", tie_word_embeddings=False)
    p = table_for_model(model, recipe, step=5, by="param")
    t = p["totals"]
    assert p["lr_factor"] == pytest.approx(0.5)
    assert t["trainable"] + t["frozen"] == t["total"] == sum(r["numel"] for r in p["rows"])
    assert t["decayed"] + t["non_decayed"] == t["trainable"] and t["frozen"] > 0
    for r in p["rows"]:
        assert r["lr"] == (0.0 if r["frozen"] else pytest.approx(1e-4 * 0.5 * r["lr_scale"]))
        assert {"name", "module", "shape", "numel", "layer_id", "tower", "lr", "weight_decay",
                "frozen", "group"} <= set(r)
    layers = table_for_model(model, recipe, step=5, by="layer")["rows"]
    assert sum(r["numel"] for r in layers) == t["total"]
    assert [(r["tower"], r["layer_id"]) for r in layers][:5] == \
        [("vision", 0), ("vision", 1), ("vision", 2), ("vision", 3), ("projector", 4)]
    assert layers[0]["frozen"] and layers[1]["frozen"] and not layers[2]["frozen"]
    assert layers[2]["lr"] == pytest.approx(1e-4 * 0.5 * 0.25)
    groups = table_for_model(model, recipe, step=5, by="group")["rows"]
    assert sum(r["numel"] for r in groups) == t["total"]
    assert groups[-1]["name"] == "frozen" and groups[-1]["group"] is None
    csv_text = to_csv(p)
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("name,module,shape,numel,tower,layer_id")
    assert len(lines) == 1 + len(p["rows"])
    json.dumps(p)  # plain data for --json


BIG = """
import json, resource, sys, time
t0 = time.time()
from vlmft.recipe import load
from vlmft.lr_table import lr_table
out = {}
for path in sys.argv[1:]:
    t = time.time()
    table = lr_table(load(path), step=1, by="layer")
    out[path] = {"seconds": time.time() - t, "rows": len(table["rows"]), **table["totals"]}
out["total_seconds"] = time.time() - t0
out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["deepspeed_imported"] = "deepspeed" in sys.modules
print(json.dumps(out))
"""


def test_lr_table_on_the_78b_and_72b_configs_is_fast_and_small():
    """Both big recipes in a fresh process (imports included): < 30 s, < 2 GB, no deepspeed."""
    recipes = ["recipes/internvl2_5-78b.yaml", "recipes/qwen2_5-vl-72b.yaml"]
    res = subprocess.run([sys.executable, "-c", BIG, *recipes], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    assert out["total_seconds"] < 30
    assert out["max_rss_mb"] < 2048
    assert not out["deepspeed_imported"]
    internvl, qwen = out[recipes[0]], out[recipes[1]]
    assert math.isclose(internvl["total"] / 1e9, 78.4, abs_tol=0.1)
    assert math.isclose(qwen["total"] / 1e9, 73.4, abs_tol=0.1)
    assert internvl["groups"] == 2 * 46 + 2 + 1  # vision layers 0..45 (x2), projector x2, rest
    assert internvl["frozen"] == 0 and qwen["frozen"] > 0


def test_nothing_to_train_and_bad_view_are_errors():
    from vlmft.lr_table import table_for_model

    all_frozen = FreezeConfig(vision=True, projector=True, language=True, lm_head=True)
    with pytest.raises(RecipeError, match="every parameter is frozen"):
        build_optimizer(tiny("qwen2_vl"), OptimConfig(freeze=all_frozen))
    with pytest.raises(ValueError, match="by: 'tower' is not one of param, layer, group"):
        table_for_model(tiny("qwen2_vl"), Recipe(), by="tower")
