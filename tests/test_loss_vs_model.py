"""vlmft's loss against references it does not share code with: the HF model's own ``labels=``
loss (its internal shift) for ``token``, and a per-sample formula written here over the model's
own logits for ``sample`` and ``square``. Each demo sample goes through the training path
(Materializer -> stream.row -> forward.LossModule), one sample a row."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlmft.data.catalog import build_catalog
from vlmft.data.stream import Materializer
from vlmft.forward import LossModule, model_inputs
from vlmft.loss import token_weights
from vlmft.model import load_model
from vlmft.models import family_of
from vlmft.recipe import load

from .conftest import DEMO, ROOT

RECORDS = [json.loads(x) for x in (ROOT / "demo" / "data" / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(processor):
    recipe = load(DEMO, ["data.packing.enabled=false"])
    catalog = build_catalog(recipe, processor, limit=12, workers=1)
    model = load_model(recipe.model).eval()
    return recipe, catalog, Materializer(recipe, catalog, processor), model, family_of(processor)


def kinds(catalog):
    """One text-only, one one-image and one two-image sample of the demo data."""
    by_images = {}
    for i, ref in enumerate(catalog.samples):
        img = RECORDS[ref.record].get("image", [])
        by_images.setdefault(len([img] if isinstance(img, str) else img), i)
    assert set(by_images) >= {0, 1, 2}
    return [by_images[0], by_images[1], by_images[2]]


def vlmft_loss(setup, i, reduction):
    recipe, catalog, mat, model, fam = setup
    batch = mat.micro_batch([[i]])
    w = token_weights(batch["labels"], batch["sample_ids"], batch["loss_weight"], reduction)
    with torch.no_grad():
        s = LossModule(model, fam, chunk_size=5)(model_inputs(fam, model, batch), w)
    return float(s / w.sum())


@pytest.mark.parametrize("kind", ["text", "one image", "two images"])
def test_token_loss_equals_the_models_own_loss(setup, kind):
    recipe, catalog, mat, model, fam = setup
    i = kinds(catalog)[["text", "one image", "two images"].index(kind)]
    enc = mat.sample(catalog.samples[i])   # labels as encoded: not shifted
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]),
                    use_cache=False, **enc.vision).loss
    assert abs(vlmft_loss(setup, i, "token") - float(ref)) <= 1e-5


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_sample_and_square_losses_follow_their_formula(setup, reduction):
    """Several samples in one step: L = sum_s w(n_s) sum_t l_t / sum_s w(n_s) n_s, with
    w(n) = 1/n or 1/sqrt(n), l_t from the model's own logits (shifted here)."""
    recipe, catalog, mat, model, fam = setup
    idx = kinds(catalog)
    num = den = 0.0
    for i in idx:
        enc = mat.sample(catalog.samples[i])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids]), use_cache=False, **enc.vision).logits[0]
        targets = torch.tensor(enc.labels[1:])
        sup = targets != -100
        n = int(sup.sum())
        w = 1.0 / n if reduction == "sample" else 1.0 / math.sqrt(n)
        num += w * float(F.cross_entropy(logits[:-1][sup].float(), targets[sup], reduction="sum"))
        den += w * n
    batch = mat.micro_batch([[i] for i in idx])   # the three in one row, as one step
    wts = token_weights(batch["labels"], batch["sample_ids"], batch["loss_weight"], reduction)
    with torch.no_grad():
        s = LossModule(model, fam, chunk_size=7)(model_inputs(fam, model, batch), wts)
    assert abs(float(s / wts.sum()) - num / den) <= 1e-5
