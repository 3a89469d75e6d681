"""Packed attention: each sample's logits inside a packed row equal its logits run alone."""

from __future__ import annotations

import torch

from vlmft.data.catalog import build_catalog
from vlmft.data.stream import Materializer, PackPlan
from vlmft.model import load_model
from vlmft.recipe import load

from .conftest import DEMO


def test_packed_row_logits_equal_separate_runs(in_root, processor):
    recipe = load(DEMO, ["data.packing.max_packed_tokens=512"])
    catalog = build_catalog(recipe, processor)
    plan = PackPlan(recipe, catalog)
    mat = Materializer(recipe, catalog, processor)
    model = load_model(recipe.model).eval()
    # the first pack holding an image sample and a text-only sample, several samples in all
    pack = next(p for p in plan.epoch(0) if len(p) >= 3
                and len({catalog.samples[i].tiles > 0 for i in p}) == 2)
    row = mat.micro_batch([pack])
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"],
                       **row["vision"], use_cache=False).logits[0]
        start, worst = 0, 0.0
        for i in pack:
            enc = mat.sample(catalog.samples[i])
            n = len(enc.input_ids)
            alone = model(input_ids=torch.tensor([enc.input_ids]), **enc.vision, use_cache=False).logits[0]
            worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
            start += n
    assert start == row["input_ids"].shape[1]
    assert worst <= 1e-4, worst
    # the check has teeth: without restarting position ids the samples see each other
    with torch.no_grad():
        leaky = model(input_ids=row["input_ids"], **row["vision"], use_cache=False).logits[0]
    n0 = len(mat.sample(catalog.samples[pack[0]]).input_ids)
    assert (leaky[n0:] - packed[n0:]).abs().max().item() > 1e-2
