"""Every supported family, on its tiny random model (tests/tiny_models.py), through the production
path: plan length == encoded length == the stock processor's own token count, and a packed row
of text-only, one-image and multi-image samples of different sizes gives each sample the logits
the model's own forward gives it alone (with the stock processor's outputs for that sample)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vlmft.data import chat, tokens
from vlmft.data.catalog import build_catalog
from vlmft.data.stream import Materializer
from vlmft.forward import hidden_states, model_inputs
from vlmft.model import load_model, load_processor
from vlmft.models import Family, family_for
from vlmft.models.gemma3 import Gemma3
from vlmft.models.qwen_vl import QwenVL
from vlmft.recipe import ModelConfig, load

from . import tiny_models

SHAPES = {"a.png": ((70, 40), "red", "circle"), "b.jpg": ((90, 60), "green", "square"),
          "c.png": ((30, 30), "blue", "triangle"), "d.png": ((28, 56), "yellow", "circle")}
RECORDS = [
    {"conversations": [{"from": "human", "value": "What is two plus three?"},
                       {"from": "gpt", "value": "two plus three is five."}]},
    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                                         {"from": "gpt", "value": "The circle is red."}]},
    {"image": ["b.jpg", "c.png"], "conversations": [
        {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich image shows green?"},
        {"from": "gpt", "value": "Image 1."}]},
    {"conversations": [{"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "Yes."}]},
    {"image": "d.png", "conversations": [{"from": "human", "value": "<image>\nDescribe the picture briefly."},
                                         {"from": "gpt", "value": "A yellow circle."}]},
]


def write_data(root) -> str:
    from PIL import Image, ImageDraw

    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    for name, ((w, h), color, _) in SHAPES.items():
        img = Image.new("RGB", (w, h), (250, 250, 250))
        ImageDraw.Draw(img).ellipse((2, 2, w // 2, h // 2), fill=colors[color])
        img.save(root / name)
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("family-data"))


def setup(family: str, data: str):
    folder = str(tiny_models.folder(family))
    recipe = load(None, [f"model.name_or_path={folder}", f"data.datasets=[{{path: '{data}'}}]",
                         "data.packing.max_packed_tokens=4096"])
    processor = load_processor(recipe.model)
    catalog = build_catalog(recipe, processor, workers=1)
    return recipe, processor, catalog


def stock_inputs(family: str, processor, record: dict, root: str) -> dict:
    """The sample as the stock processor makes it: the whole rendered conversation at once."""
    from PIL import Image

    msgs, paths = chat.messages(record, root)
    imgs = [Image.open(p).convert("RGB") for p in paths] or None
    if family == "paligemma":  # a prefix-LM: prompt and answer go in separately
        prompt = "".join("<image>" if c["type"] == "image" else c["text"] for c in msgs[0]["content"])
        answer = msgs[1]["content"][0]["text"]
        out = processor(text=[prompt], images=imgs, suffix=[answer], return_tensors="pt")
        out.pop("labels", None)
    else:
        text = chat.template_text(processor, msgs)
        out = processor(text=[text], images=imgs, return_tensors="pt", add_special_tokens=False)
    out.pop("attention_mask", None)
    return dict(out)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_plan_equals_encoding_equals_stock_processor(family, data):
    recipe, processor, catalog = setup(family, data)
    text_only = sum("image" not in r for r in RECORDS)
    if family == "paligemma":  # its processor takes no text-only sample: dropped and counted
        assert dict(catalog.dropped) == {"no_image": text_only}
    assert len(catalog.samples) + sum(catalog.dropped.values()) == len(RECORDS), dict(catalog.dropped)
    mat = Materializer(recipe, catalog, processor)
    root = data.rsplit("/", 1)[0]
    for ref in catalog.samples:
        enc = mat.sample(ref)
        assert enc is not None, dict(catalog.dropped)
        assert len(enc.input_ids) == ref.length
        stock = stock_inputs(family, processor, RECORDS[ref.record], root)
        assert enc.input_ids == stock["input_ids"][0].tolist(), family


def packed_vs_alone(family: str, data: str, fam_override=None, mutate=None, kernel=None, prepare=None) -> float:
    """Max |logit difference| between each sample inside one packed row (built and run as
    training does) and the sample alone through the model's own forward; ``fam_override``
    replaces the family adapter, ``mutate`` edits the model inputs (the controls). ``kernel``:
    the packed row runs with this attention kernel (the samples alone with the default);
    ``prepare(model)`` edits the packed row's model after loading."""
    recipe, processor, catalog = setup(family, data)
    ref = load_model(recipe.model).eval()
    model = load_model(dataclasses.replace(recipe.model, attn_implementation=kernel)).eval() if kernel else ref
    if prepare:
        model = load_model(recipe.model).eval() if model is ref else model
        prepare(model)
    fam = fam_override or family_for(model.config.model_type)
    mat = Materializer(recipe, catalog, processor)
    # image, text, two images, text, image: every kind follows every kind (PaliGemma: images only)
    order = [i for i in (1, 0, 2, 3, 4) if family != "paligemma" or "image" in RECORDS[i]]
    order = [next(k for k, ref in enumerate(catalog.samples) if ref.record == i) for i in order]
    batch = mat.micro_batch([order])
    root = data.rsplit("/", 1)[0]
    with torch.no_grad():
        inputs = model_inputs(fam, model, batch)
        if mutate:
            mutate(inputs)
        packed = model.get_output_embeddings()(hidden_states(model, fam, inputs))[0]
        start, worst = 0, 0.0
        for k in order:
            record = RECORDS[catalog.samples[k].record]
            alone = ref(**stock_inputs(family, processor, record, root), use_cache=False).logits[0]
            n = alone.shape[0]
            worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
            start += n
    assert start == batch["input_ids"].shape[1]
    return worst


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_packed_row_equals_each_sample_alone(family, data):
    assert packed_vs_alone(family, data) <= 1e-4


def _no_restart(inputs):
    pos = inputs["model"]["position_ids"]
    pos[..., :] = torch.arange(pos.shape[-1])


@pytest.mark.parametrize("family", [f for f in tiny_models.FAMILIES if f != "gemma3"])
def test_control_positions_that_do_not_restart_leak(family, data):
    """The check has teeth: one position sequence over the whole row lets samples see each other.
    (Gemma 3's packed rows are isolated by vlmft's explicit masks, not by the positions: a
    sample's positions shifted by a constant leave RoPE attention unchanged, 9e-7 measured.)"""
    assert packed_vs_alone(family, data, mutate=_no_restart) > 1e-2


def test_control_qwen_needs_its_mrope_rows(data):
    """Qwen fed 1-D restarting ids (what other families take) is wrong for image tokens."""
    class OneD(QwenVL):
        def position_ids(self, model, batch):
            return batch["position_ids"]

    assert packed_vs_alone("qwen2_5_vl", data, fam_override=OneD()) > 1e-2


def test_control_gemma3_needs_its_own_masks(data):
    """Gemma 3 with transformers' own masks for the packed row (token_type_ids passed)."""
    class Stock(Gemma3):
        def model_inputs(self, model, batch):
            return Family.model_inputs(self, model, batch)

        def attention_mask(self, model, batch, hidden):
            return None

    assert packed_vs_alone("gemma3", data, fam_override=Stock()) > 1e-2


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_plan_equals_encoding_for_every_demo_sample(family, in_root):
    """The bundled demo data (240 conversations, 48 images of 6 sizes) through every family."""
    folder = str(tiny_models.folder(family))
    recipe = load("recipes/demo.yaml", [f"model.name_or_path={folder}", "data.packing.max_packed_tokens=4096"])
    processor = load_processor(recipe.model)
    catalog = build_catalog(recipe, processor, workers=1)
    expected = {"no_image": 80} if family == "paligemma" else {}   # its 80 text-only samples
    assert dict(catalog.dropped) == expected
    mat = Materializer(recipe, catalog, processor)
    for ref in catalog.samples:
        enc = mat.sample(ref)   # raises nothing; a plan_mismatch would be a counted bad sample
        assert enc is not None and len(enc.input_ids) == ref.length, catalog.records[ref.record].where
    assert not catalog.dropped.get("plan_mismatch")


def test_llava_next_image_newline_is_placed_with_the_projector(in_root):
    from vlmft.lr_table import lr_table

    r = load("recipes/demo.yaml", [f"model.name_or_path={tiny_models.folder('llava_next')}"])
    rows = {row["name"]: row for row in lr_table(r)["rows"]}
    assert rows["model.image_newline"]["tower"] == "projector"
