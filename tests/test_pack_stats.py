"""``vlmft pack-stats``: the JSON on the demo recipe, the CLI, --data, the rendering, the
worker pool, and (slow) 100,000 samples with images in under 60 s."""

from __future__ import annotations

import json
import time

import pytest

from vlmft import pack_stats as ps
from vlmft import recipe as recipes
from vlmft.data import catalog as catmod

from .conftest import DEMO, ROOT, vlmft

DATA = ROOT / "demo" / "data" / "train.jsonl"
TIMING = ("plan_seconds", "samples_per_second", "strategies")


@pytest.fixture(scope="module")
def demo_stats(processor):
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return ps.pack_stats(recipes.load(str(DEMO)))
    finally:
        os.chdir(cwd)


def test_demo_stats(demo_stats):
    s = demo_stats
    assert s["num_samples"] == 480
    assert s["num_used"] + sum(s["dropped"].values()) == s["num_samples"]
    assert s["num_packs"] >= s["lower_bound_packs"] > 0
    assert 0 < s["fill_ratio"] <= 1
    cap = s["max_packed_tokens"]
    assert s["lower_bound_packs"] == -(-s["total_tokens"] // cap)
    assert s["padding_tokens"] == s["num_packs"] * cap - s["total_tokens"]
    assert s["fill_ratio"] == pytest.approx(s["total_tokens"] / (s["num_packs"] * cap))
    for key in ("samples_per_pack", "tiles_per_pack"):
        d = s[key]
        assert set(d) == {"mean", "p50", "p90", "max"} and d["p50"] <= d["p90"] <= d["max"]
    assert s["samples_per_pack"]["mean"] * s["num_packs"] == pytest.approx(s["num_used"])
    assert s["tiles_per_pack"]["mean"] * s["num_packs"] == pytest.approx(s["total_tiles"])
    assert sum(b["count"] for b in s["length_histogram"]) == s["num_used"]
    assert s["length_histogram"][-1]["hi"] == cap
    assert set(s["strategies"]) == {"best_fit", "internvl", "next_fit", "offline_bfd"}
    st = s["strategies"]
    assert st["best_fit"]["num_packs"] == s["num_packs"]
    for v in st.values():
        assert v["num_packs"] >= s["lower_bound_packs"] and 0 < v["fill_ratio"] <= 1
    assert st["offline_bfd"]["num_packs"] <= st["next_fit"]["num_packs"]
    (d,) = s["per_dataset"].values()
    assert d["num_samples"] == 480 and d["num_used"] == s["num_used"] and d["tokens"] == s["total_tokens"]
    assert s["samples_per_second"] > 0 and s["truncated"] == 0
    json.dumps(s)  # plain data


def test_cli_json_matches_the_library(demo_stats):
    p = vlmft("pack-stats", str(DEMO), "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    for k in set(demo_stats) - set(TIMING):
        assert s[k] == demo_stats[k], k
    assert {k: v["num_packs"] for k, v in s["strategies"].items()} == \
        {k: v["num_packs"] for k, v in demo_stats["strategies"].items()}


def test_cli_data_replaces_the_datasets(tmp_path):
    lines = DATA.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[70:]) + "\n")
    meta = tmp_path / "meta.json"
    root = str(ROOT / "demo" / "data")
    meta.write_text(json.dumps({"first": {"root": root, "annotation": "a.jsonl"},
                                "rest": {"root": root, "annotation": "b.jsonl", "repeat_time": 0.5}}))
    p = vlmft("pack-stats", str(DEMO), "--data", str(meta), "--limit", "50", "--strategy", "next_fit",
              "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["recipe_strategy"] == "next_fit"
    assert s["num_samples"] == 50 + 25
    assert {k: v["num_samples"] for k, v in s["per_dataset"].items()} == {"first": 50, "rest": 25}
    assert s["num_packs"] == s["strategies"]["next_fit"]["num_packs"]


def test_render_draws_tables_and_a_histogram(demo_stats):
    from rich.console import Console

    con = Console(record=True, width=120)
    con.print(ps.render(demo_stats))
    text = con.export_text()
    for word in ("pack-stats", "fill ratio", "best_fit (recipe)", "internvl", "next_fit",
                 "offline_bfd", "sample lengths", "datasets"):
        assert word in text, word
    assert "█" in text


def test_render_lists_dropped_samples():
    from rich.console import Console

    stats = {"max_packed_tokens": 8, "lower_bound_packs": 1, "num_packs": 1, "num_samples": 3,
             "num_used": 1, "num_dropped": 2, "truncated": 0, "truncated_examples": [],
             "total_tokens": 5, "supervised_tokens": 2, "total_tiles": 0, "recipe_strategy": "best_fit",
             "max_tiles_per_pack": 0, "fill_ratio": 0.625, "padding_tokens": 3,
             "samples_per_pack": {"mean": 1, "p50": 1, "p90": 1, "max": 1},
             "tiles_per_pack": {"mean": 0, "p50": 0, "p90": 0, "max": 0},
             "samples_per_second": 10.0, "plan_seconds": 0.3,
             "dropped": {"missing_image": 2}, "dropped_examples": {"missing_image": ["a.jsonl:3: x.png"]},
             "rank_balance": {"steps": 0},
             "strategies": {"best_fit": {"num_packs": 1, "fill_ratio": 0.625, "padding_tokens": 3}},
             "per_dataset": {"a": {"repeat_time": 1.0, "num_samples": 3, "num_used": 1,
                                   "dropped": {"missing_image": 2}, "tokens": 5, "mean_length": 5.0,
                                   "tiles": 0}},
             "length_histogram": [{"lo": 1, "hi": 4, "count": 0}, {"lo": 5, "hi": 8, "count": 1}]}
    con = Console(record=True, width=120)
    con.print(ps.render(stats))
    text = con.export_text()
    assert "missing_image" in text and "a.jsonl:3: x.png" in text


def test_progress_bar_only_on_long_inputs(capsys):
    bar = ps._Progress(True)
    with bar:
        bar.step(10, 100)
        assert bar.bar is None
        bar.step(1000, ps.PROGRESS_MIN_RECORDS)
        assert bar.bar is not None
    quiet = ps._Progress(False)
    with quiet:
        quiet.step(10, 10**6)
    assert quiet.bar is None


def test_worker_pool_gives_the_same_catalog(tmp_path, processor, in_root):
    """Records planned by forked workers come back in order: same samples, drops, examples."""
    rows = DATA.read_text().splitlines()
    n = catmod.CHUNK * 2 + 77
    out = []
    for i in range(n):
        r = json.loads(rows[i % len(rows)])
        r["conversations"][0]["value"] += f" ({i})"
        if i % 97 == 5:
            r["image"] = "images/none.png"
        out.append(json.dumps(r) if i % 211 != 3 else "{broken")
    (tmp_path / "images").symlink_to(ROOT / "demo" / "data" / "images")
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(out) + "\n")
    r = recipes.load(str(DEMO), [f"data.datasets=[{{path: '{path}'}}]"])
    steps = []
    one = catmod.build_catalog(r, processor, workers=1)
    two = catmod.build_catalog(r, processor, workers=2, on_step=lambda d, t: steps.append((d, t)))
    assert len(one.samples) > 0 and one.dropped["invalid_json"] > 0 and one.dropped["missing_image"] > 0
    assert [(s.record, s.length, s.tiles, s.n_supervised) for s in one.samples] == \
        [(s.record, s.length, s.tiles, s.n_supervised) for s in two.samples]
    assert one.dropped == two.dropped and dict(one.examples) == dict(two.examples)
    assert steps[-1] == (n, n) and [d for d, _ in steps] == sorted(d for d, _ in steps)


def write_100k(path, n=100_000):
    """n conversation samples naming the 48 demo images (70% one image, 10% two, 20% text),
    every text different (the tokenizer sees no repeats)."""
    import random

    rng = random.Random(0)
    imgs = sorted(p.name for p in (ROOT / "demo" / "data" / "images").iterdir())
    words = ("red green blue yellow purple orange circle square triangle shape colour image picture "
             "which what where left right one two three four five six seven eight nine ten").split()

    def say(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for i in range(n):
            k = rng.random()
            if k < 0.7:
                r = {"image": "images/" + rng.choice(imgs), "conversations": [
                    {"from": "human", "value": f"<image>\n{say(3, 20)}? ({i})"},
                    {"from": "gpt", "value": say(2, 40) + "."}]}
            elif k < 0.8:
                a, b = rng.sample(imgs, 2)
                r = {"image": ["images/" + a, "images/" + b], "conversations": [
                    {"from": "human", "value": f"Image 1: <image>\nImage 2: <image>\n{say(3, 12)}? ({i})"},
                    {"from": "gpt", "value": say(2, 20) + "."}]}
            else:
                r = {"conversations": [{"from": "human", "value": f"{say(5, 40)}? ({i})"},
                                       {"from": "gpt", "value": say(5, 80) + "."}]}
            f.write(json.dumps(r) + "\n")


@pytest.mark.slow
def test_pack_stats_on_100k_samples_with_images_under_60s(tmp_path):
    (tmp_path / "images").symlink_to(ROOT / "demo" / "data" / "images")
    path = tmp_path / "100k.jsonl"
    write_100k(path)
    t = time.perf_counter()
    p = vlmft("pack-stats", str(DEMO), "--data", str(path), "--json", "data.packing.max_packed_tokens=2048",
              timeout=300)
    wall = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(p.stdout)
    assert s["num_samples"] == 100_000 and s["num_used"] == 100_000
    assert s["num_packs"] >= s["lower_bound_packs"] and s["total_tiles"] > 100_000
    assert wall < 60, f"pack-stats took {wall:.1f} s on 100,000 samples"


EDGE = [
    {"conversations": [{"from": "human", "value": "hi  \n"}, {"from": "gpt", "value": "  yo \n\n"}]},
    {"image": ["images/001_blue_square.png", "images/002_blue_circle.png"], "conversations": [
        {"from": "human", "value": "<image>\n\n<image>x\n"}, {"from": "gpt", "value": ""}]},
    {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "q"},
                       {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"},
                       {"from": "gpt", "value": "a2 \t"}]},
]


@pytest.mark.parametrize("edit", [None, "| trim", "| tojson", "| upper"])
def test_fast_segments_equal_the_template_rendered_prefix_by_prefix(edit):
    """The skeleton paths (no render, or one checked render per sample) give exactly the
    segments of rendering every prefix with apply_chat_template, also under templates that
    edit the text (then the fast path must step aside)."""
    from vlmft.data import chat
    from vlmft.model import load_processor
    from vlmft.recipe import ModelConfig

    fast = load_processor(ModelConfig(name_or_path=str(ROOT / "demo" / "model")))
    slow = load_processor(ModelConfig(name_or_path=str(ROOT / "demo" / "model")))
    if edit:
        for p in (fast, slow):
            p.chat_template = p.chat_template.replace("{{ c['text'] }}", "{{ c['text'] %s }}" % edit)
    chat._fast(slow).template = None          # every prefix through apply_chat_template
    root = ROOT / "demo" / "data"
    records = [json.loads(r) for r in DATA.read_text().splitlines()] + EDGE
    for rec in records:
        got = chat.sample_segments(fast, rec, root)
        want = chat.segments(slow, *chat.messages(rec, root))
        assert [(s.text, s.supervised, s.images) for s in got] == \
            [(s.text, s.supervised, s.images) for s in want], rec
    blind = [b is not None for _, b in chat._fast(fast).shapes.values()]
    assert all(blind) if edit is None else not any(blind)


def test_rank_balance_is_reported_against_round_robin(in_root):
    from vlmft import pack_stats as ps
    from vlmft.recipe import load

    s = ps.pack_stats(load("recipes/demo.yaml"), world_size=2)
    rb = s["rank_balance"]
    assert rb["world"] == 2 and rb["per_rank"] == 2 and rb["steps"] == s["num_packs"] // 4
    assert 1.0 <= rb["balanced"]["max_over_mean"] <= rb["round_robin"]["max_over_mean"]


def test_rank_compute_per_step_is_reported_as_training_deals_it(in_root, processor):
    """One pack a rank, 4 ranks: the reported worst and mean slowest-rank / mean-rank compute
    equal a hand computation over the plan's first round (cost written out here)."""
    import dataclasses

    import numpy as np

    from vlmft.data.catalog import build_catalog
    from vlmft.data.stream import PackPlan
    from vlmft.recipe import load

    r = load("recipes/demo.yaml", ["train.grad_accum_steps=1", "data.packing.balance_compute=true",
                                   "data.attention_cost_length=256"])
    s = ps.pack_stats(r, world_size=4)
    cat = build_catalog(dataclasses.replace(r, data=dataclasses.replace(r.data, on_bad_sample="skip")),
                        processor)
    d = r.data
    cost = lambda i: (cat.samples[i].length + cat.samples[i].length ** 2 / d.attention_cost_length  # noqa: E731
                      + d.tile_cost * cat.samples[i].tiles)
    packs = PackPlan(r, cat, global_batch=4).round(0).packs
    c = np.array([sum(cost(i) for i in p) for p in packs])
    steps = c[:len(c) // 4 * 4].reshape(-1, 4)
    ratio = steps.max(axis=1) / steps.mean(axis=1)
    assert s["rank_compute_max_over_mean"] == pytest.approx(ratio.max())
    assert s["rank_compute_mean_max_over_mean"] == pytest.approx(ratio.mean())
    assert s["rank_balance"]["steps"] == len(steps) and 1.0 <= ratio.mean() <= ratio.max()
    json.dumps(s)
