"""Sources: conversation JSONL and InternVL meta JSON (root, annotation, repeat_time,
data_augment, max_dynamic_patch), several datasets in one recipe."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from vlmft import recipe as recipes
from vlmft.data import catalog as catmod
from vlmft.data import chat, json_array, sources
from vlmft.recipe import DatasetConfig, RecipeError

from .conftest import ROOT

DEMO = ROOT / "demo" / "data"


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n, image=None, tag="q"):
    out = []
    for i in range(n):
        r = {"id": i, "conversations": [{"from": "human", "value": f"{tag} {i}?"},
                                        {"from": "gpt", "value": f"answer {i}."}]}
        if image:
            r["image"] = image
        out.append(r)
    return out


def test_jsonl_records_cite_file_and_line_and_skip_blank_lines(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [_rows(1)[0], "", "  ", _rows(2)[1], "{oops"])
    ds = sources.expand([DatasetConfig(path=str(p))])
    assert ds[0].name == "a" and ds[0].image_root == tmp_path
    recs = sources.read(0, ds[0], seed=0)
    assert [r.where for r in recs] == [f"{p}:1", f"{p}:4", f"{p}:5"]
    assert recs[0].data["id"] == 0 and not recs[0].error
    assert recs[2].error == "invalid_json" and recs[2].data is None
    assert len(sources.read(0, ds[0], seed=0, limit=2)) == 2


def test_repeat_time_fraction_is_a_seeded_subset_and_above_one_repeats():
    items = list(range(100))
    a = sources.apply_repeat(items, 0.3, seed=1)
    assert len(a) == 30 and len(set(a)) == 30 and a == sorted(a)
    assert a == sources.apply_repeat(items, 0.3, seed=1)
    assert a != sources.apply_repeat(items, 0.3, seed=2)
    assert sources.apply_repeat(items, 2.0, seed=0) == items + items
    b = sources.apply_repeat(items, 2.5, seed=0)
    assert len(b) == 250 and b[:200] == items * 2 and len(set(b[200:])) == 50
    assert sources.apply_repeat(items, 1.0, seed=0) == items


def _meta_tree(tmp_path):
    """Two InternVL datasets with their own image roots, named from the meta file's folder."""
    for sub in ("coco", "charts"):
        (tmp_path / sub / "images").mkdir(parents=True)
        Image.new("RGB", (56, 56), (200, 40, 40)).save(tmp_path / sub / "images" / "x.png")
    _jsonl(tmp_path / "coco" / "train.jsonl", _rows(40, image="x.png", tag="coco"))
    _jsonl(tmp_path / "charts" / "train.jsonl", _rows(10, image="x.png", tag="chart"))
    meta = {
        "coco": {"root": "coco/images", "annotation": "coco/train.jsonl", "repeat_time": 0.5,
                 "data_augment": True, "max_dynamic_patch": 1, "length": 40},
        "charts": {"root": "charts/images/", "annotation": "charts/train.jsonl", "repeat_time": 3},
    }
    p = tmp_path / "meta.json"
    p.write_text(json.dumps(meta))
    return p


def test_internvl_meta_json_entries_become_datasets(tmp_path):
    meta = _meta_tree(tmp_path)
    ds = sources.expand([DatasetConfig(path=str(meta), loss_weight=2.0)])
    assert [d.name for d in ds] == ["coco", "charts"]
    coco, charts = ds
    assert coco.annotation == tmp_path / "coco" / "train.jsonl"
    assert coco.image_root == tmp_path / "coco" / "images"
    assert coco.repeat_time == 0.5 and coco.data_augment and coco.max_dynamic_patch == 1
    assert charts.repeat_time == 3 and not charts.data_augment and charts.max_dynamic_patch == 0
    assert coco.loss_weight == charts.loss_weight == 2.0
    assert len(sources.read(0, coco, seed=0)) == 20
    assert len(sources.read(1, charts, seed=0)) == 30
    # the recipe entry's repeat_time multiplies the meta entry's
    ds2 = sources.expand([DatasetConfig(path=str(meta), repeat_time=2.0)])
    assert [d.repeat_time for d in ds2] == [1.0, 6.0]


def test_meta_paths_fall_back_to_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "run" / "data").mkdir(parents=True)
    _jsonl(tmp_path / "run" / "data" / "t.jsonl", _rows(3))
    (tmp_path / "metas").mkdir()
    meta = tmp_path / "metas" / "m.json"
    meta.write_text(json.dumps({"t": {"root": "data", "annotation": "data/t.jsonl"}}))
    monkeypatch.chdir(tmp_path / "run")      # InternVL names paths from where training starts
    (d,) = sources.expand([DatasetConfig(path=str(meta))])
    assert d.annotation.resolve() == (tmp_path / "run" / "data" / "t.jsonl").resolve()
    assert len(sources.read(0, d, seed=0)) == 3


@pytest.mark.parametrize("meta, message", [
    ({"a": {"root": "."}}, "entry 'a' needs an 'annotation'"),
    ({"a": {"annotation": "nope.jsonl"}}, "annotation 'nope.jsonl' not found"),
    ({"a": {"annotation": "t.jsonl", "repeat_time": "lots"}}, "'repeat_time' must be a number"),
    ({"a": {"annotation": "t.jsonl", "repeat_time": 0}}, "'repeat_time' must be > 0"),
    ("a string", "a JSON array of records"),
    ({"conversations": []}, "holds a single record"),
])
def test_bad_meta_json_is_a_recipe_error(tmp_path, meta, message):
    _jsonl(tmp_path / "t.jsonl", _rows(1))
    p = tmp_path / "m.json"
    p.write_text(json.dumps(meta))
    with pytest.raises(RecipeError) as e:
        sources.expand([DatasetConfig(path=str(p))])
    assert message in str(e.value) and "data.datasets[0].path" in str(e.value)


def test_meta_json_not_json_cites_its_line(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{\n  "a": {"annotation": "t.jsonl",}\n}')
    with pytest.raises(RecipeError, match=r"m\.json:2: not valid JSON"):
        sources.expand([DatasetConfig(path=str(p))])


def test_several_datasets_in_one_recipe_with_max_dynamic_patch(tmp_path, in_root):
    """InternVL's max_dynamic_patch caps each dataset's tiles (the tiny InternVL: 28-pixel tiles)."""
    from vlmft.model import load_processor

    from . import tiny_models

    meta = _meta_tree(tmp_path)
    extra = _jsonl(tmp_path / "text.jsonl", _rows(5, tag="plain"))
    r = recipes.load(str(ROOT / "recipes" / "demo.yaml"),
                     [f"data.datasets=[{{path: '{meta}'}}, {{path: '{extra}', name: plain}}]",
                      f"model.name_or_path={tiny_models.folder('internvl')}"])
    processor = load_processor(r.model)
    cat = catmod.build_catalog(r, processor)
    assert [d.name for d in cat.datasets] == ["coco", "charts", "plain"]
    assert len(cat.records) == 20 + 30 + 5 == len(cat.samples)
    by_ds = {i: [s for s in cat.samples if s.dataset == i] for i in range(3)}
    assert [len(v) for v in by_ds.values()] == [20, 30, 5]
    # the demo image (56x56 at 28-pixel tiles) is 4 tiles + thumbnail by default, 1 tile in coco
    assert {s.tiles for s in by_ds[0]} == {1}
    assert {s.tiles for s in by_ds[1]} == {5}
    assert {s.tiles for s in by_ds[2]} == {0}
    # images resolve against each entry's root
    rec = cat.records[by_ds[1][0].record]
    segs = catmod.segments(processor, cat, rec)
    assert [str(p) for s in segs for p in s.images] == [str(tmp_path / "charts" / "images" / "x.png")]
    # charts samples repeated 3x: the same lines, cited by their file:line
    assert len({cat.records[s.record].where for s in by_ds[1]}) == 10


def test_turns_match_the_chat_messages(processor):
    rec = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\n\nWhich?"},
        {"from": "gpt", "value": "The first."}]}
    ts, imgs = sources.turns(rec)
    assert imgs == ["a.png", "b.png"]
    assert ts == [("system", ["sys"]), ("user", ["Image 1: ", None, "Image 2: ", None, "Which?"]),
                  ("assistant", ["The first."])]
    msgs, paths = chat.messages(rec, DEMO)
    assert msgs[1]["content"][1] == {"type": "image"} and paths == [str(DEMO / "a.png"), str(DEMO / "b.png")]


# ---------------------------------------------------------------- JSON arrays and messages

def test_json_array_dataset_is_read_like_the_same_jsonl(tmp_path, processor, in_root):
    """LLaVA's own format (one JSON array, here pretty-printed) plans exactly as the same
    records one per line; records cite their first line and index; read in small chunks too."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:30]]
    jsonl = _jsonl(tmp_path / "a.jsonl", rows)
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(rows, indent=2))
    cats = [catmod.build_catalog(recipes.load(str(ROOT / "recipes" / "demo.yaml"), [
        f"data.datasets=[{{path: '{p}', image_root: '{DEMO}'}}]"]), processor) for p in (jsonl, arr)]
    assert [(s.length, s.tiles, s.n_supervised) for s in cats[0].samples] == \
        [(s.length, s.tiles, s.n_supervised) for s in cats[1].samples]
    lines = arr.read_text().splitlines()
    for i, rec in enumerate(cats[1].records):
        path_line, index = rec.where.split(" (")
        assert index == f"record {i})" and path_line.startswith(f"{arr}:")
        n = int(path_line.rsplit(":", 1)[1])
        assert lines[n - 1] == "  {" and lines[n] == f'    "id": {rows[i]["id"]},'
    old = json_array.ARRAY_CHUNK
    try:
        json_array.ARRAY_CHUNK = 7                # records cut by every chunk boundary
        assert [json.loads(text) for _, text in json_array.records(arr)] == rows
        assert len(list(json_array.records(arr, limit=3))) == 3
    finally:
        json_array.ARRAY_CHUNK = old


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1},', "record 1 is not valid JSON"),
    ('[{"a": 1} {"b": 2}]', "expected ',' or ']' after record 0"),
    ('[{"a": 1}', "the array is not closed"),
    ('\n\n[{"a": 1},\n {"a": tru}]', ":4: record 1 is not valid JSON"),
    ("", "not a JSON array"),
])
def test_a_broken_json_array_cites_file_and_line(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        list(json_array.records(path))
    assert f"{path}:" in e.value.errors[0] and message in e.value.errors[0]


def test_json_array_and_meta_json_are_told_apart_by_shape(tmp_path):
    arr = tmp_path / "x.json"
    arr.write_text("\n  [" + json.dumps(_rows(2))[1:])
    (d,) = sources.expand([DatasetConfig(path=str(arr))])
    assert d.annotation == arr and len(sources.read(0, d, seed=0)) == 2
    _jsonl(tmp_path / "t.jsonl", _rows(3))
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"t": {"annotation": "t.jsonl"}}))
    (d,) = sources.expand([DatasetConfig(path=str(meta))])
    assert d.name == "t" and len(sources.read(0, d, seed=0)) == 3


LLAVA = {"image": ["a.png", "b.png"], "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\nFirst. <image>\nSecond?"},
    {"from": "gpt", "value": "Two."}]}


@pytest.mark.parametrize("record", [
    {"images": ["a.png", "b.png"], "messages": [                    # ms-swift: strings
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nFirst. <image>\nSecond?"},
        {"role": "assistant", "content": "Two."}]},
    {"messages": [                                                  # parts with paths
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "First. "},
                                     {"type": "image_url", "image_url": {"url": "file://b.png"}},
                                     {"type": "text", "text": "Second?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]}]},
    {"images": ["a.png", "b.png"], "messages": [                    # TRL: parts take 'images'
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First. "},
                                     {"type": "image"}, {"type": "text", "text": "Second?"}]},
        {"role": "assistant", "content": "Two."}]},
])
def test_messages_format_gives_the_turns_of_the_same_llava_record(record):
    assert sources.turns(record) == sources.turns(LLAVA)


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "missing_key"),
    ({"messages": [{"role": "user"}]}, "missing_key"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]},
     "missing_key"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     "image_count_mismatch"),
    ({"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": [{"type": "image"}]},
                                                  {"role": "assistant", "content": "x"}]}, "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image", "image": "a.png"}]}]}, "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "https://x/a.png"}]},
                   {"role": "assistant", "content": "x"}]}, "missing_image"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_supervised_tokens"),
])
def test_bad_messages_records_are_counted_by_reason(record, reason):
    with pytest.raises(chat.BadSample) as e:
        sources.turns(record)
    assert e.value.reason == reason


def test_messages_records_train_like_conversations(tmp_path, processor, in_root):
    """The demo converted to the messages format plans to the same samples."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:40]]
    converted = []
    for r in rows:
        msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                 "content": t["value"]} for t in r["conversations"]]
        imgs = r.get("image", [])
        converted.append({"messages": msgs, "images": [imgs] if isinstance(imgs, str) else imgs})
    a = _jsonl(tmp_path / "conv.jsonl", rows)
    b = _jsonl(tmp_path / "msgs.jsonl", converted)
    cats = [catmod.build_catalog(recipes.load(str(ROOT / "recipes" / "demo.yaml"), [
        f"data.datasets=[{{path: '{p}', image_root: '{DEMO}'}}]"]), processor) for p in (a, b)]
    assert not cats[1].dropped and len(cats[1].samples) == 40
    assert [(s.length, s.tiles, s.n_supervised) for s in cats[0].samples] == \
        [(s.length, s.tiles, s.n_supervised) for s in cats[1].samples]


def test_messages_images_without_placeholders_go_before_the_first_user_text():
    """InternVL's rule, as for LLaVA records: images with no placeholder lead the first user turn."""
    msgs = {"images": ["a.png"], "messages": [{"role": "user", "content": "What is it?"},
                                             {"role": "assistant", "content": "A square."}]}
    llava = {"image": "a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                 {"from": "gpt", "value": "A square."}]}
    assert sources.turns(msgs) == sources.turns(llava)
    assert sources.turns(msgs)[0][0] == ("user", [None, "What is it?"])
