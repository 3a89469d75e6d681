"""Chat template rendering, labels and planning, on the demo model's real processor and images."""

from __future__ import annotations

import json

import pytest

from vlmft.data import chat, tokens

from .conftest import ROOT

DATA = ROOT / "demo" / "data"
RECORDS = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]


def _encode(processor, record):
    msgs, paths = chat.messages(record, DATA)
    segs = chat.segments(processor, msgs, paths)
    (plan,) = tokens.plan_many(processor, [(segs, 0)])
    return plan, tokens.encode(processor, segs)


def test_labels_are_exactly_assistant_content_and_end_of_turn(processor):
    rec = {"image": "images/000_yellow_square.jpg", "conversations": [
        {"from": "system", "value": "You describe pictures briefly."},
        {"from": "human", "value": "<image>\nWhat shape do you see?"},
        {"from": "gpt", "value": "A yellow square."},
        {"from": "human", "value": "Is it round?"},
        {"from": "gpt", "value": "No."}]}
    _, enc = _encode(processor, rec)
    tok = processor.tokenizer
    # supervised runs, decoded
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["A yellow square.<|im_end|>", "No.<|im_end|>"]
    image_ids = tokens.image_ids(processor)
    assert sum(t in image_ids for t in enc.input_ids) > 0
    assert all(lab == -100 for t, lab in zip(enc.input_ids, enc.labels) if t in image_ids)


def test_plan_from_headers_equals_encoded_length_for_every_demo_sample(processor):
    for rec in RECORDS:
        plan, enc = _encode(processor, rec)
        assert plan.length == len(enc.input_ids), rec
        assert plan.tiles == enc.tiles, rec
        assert plan.n_supervised == sum(lab != -100 for lab in enc.labels), rec


def test_tiles_are_counted_apart_from_images_and_text_only_has_none(processor):
    multi = next(r for r in RECORDS if isinstance(r.get("image"), list))
    plan, enc = _encode(processor, multi)
    assert plan.num_images == 2 and plan.tiles >= 2
    # LLaVA-NeXT: [images, patches (padded to the most), 3, H, W]; an image's tiles are its
    # base tile plus its anyres grid, which image_sizes decide
    assert enc.vision["pixel_values"].shape[0] == 2 == len(enc.vision["image_sizes"])
    assert enc.vision["pixel_values"].shape[1] <= plan.tiles == enc.tiles
    text = next(r for r in RECORDS if "image" not in r)
    plan, enc = _encode(processor, text)
    assert plan.tiles == 0 and not enc.vision  # no dummy tile


def test_image_without_placeholder_goes_before_first_question(processor):
    rec = {"image": "images/001_blue_square.png",
           "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}]}
    msgs, paths = chat.messages(rec, DATA)
    assert msgs[0]["content"][0] == {"type": "image"} and len(paths) == 1


@pytest.mark.parametrize("record, reason", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
     "image_count_mismatch"),
    ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "unknown_role"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no_supervised_tokens"),
    ({"image": "a.png"}, "missing_key"),
    ({"conversations": [{"from": "human"}]}, "missing_key"),
])
def test_bad_records_name_their_reason(record, reason):
    with pytest.raises(chat.BadSample) as e:
        chat.messages(record, DATA)
    assert e.value.reason == reason
