"""Nothing dropped silently: the drop table per dataset, the limit a too_long drop needs, the
per-dataset budget before training, and the budget during training counting planning drops
and materialization failures together."""

from __future__ import annotations

import json

import pytest

from vlmft import recipe as recipes
from vlmft.data import catalog as catmod
from vlmft.data import drops

from .conftest import DEMO, ROOT, vlmft

DEMO_DATA = ROOT / "demo" / "data" / "train.jsonl"


def _image_rows(n: int) -> list[str]:
    """The first n demo lines that have one image."""
    return [line for line in DEMO_DATA.read_text().splitlines()
            if isinstance(json.loads(line).get("image"), str)][:n]


def _two_datasets(tmp_path, extra_rows: list[str], image_root: str):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(extra_rows) + "\n")
    return [f"data.datasets=[{{path: '{DEMO_DATA}'}}, {{path: '{extra}', image_root: '{image_root}'}}]"], extra


def test_a_dataset_lost_to_a_wrong_image_root_is_named(tmp_path, processor, in_root):
    (tmp_path / "nowhere").mkdir()
    over, extra = _two_datasets(tmp_path, _image_rows(30), str(tmp_path / "nowhere"))
    cat = catmod.build_catalog(recipes.load(DEMO, over), processor)
    rows = drops.per_dataset(cat)
    assert [(r["read"], r["used"], r["dropped"]) for r in rows] == [(480, 480, 0), (30, 0, 30)]
    assert rows[1]["reasons"]["missing_image"]["count"] == 30
    (line,) = drops.budget_errors(cat, 0.01)
    assert line.startswith(f"dataset 'extra' ({extra}): all 30 samples dropped (missing_image 30; "
                           f"e.g. {extra}:1: {tmp_path / 'nowhere'}/images/")
    assert "set image_root" in line
    assert drops.budget_errors(cat, 1.0) == [line]             # all lost stops even at 100% allowed
    table = drops.table_lines(cat)
    assert table[0] == "vlmft: 30 of 510 samples dropped while planning (reason, count, first examples):"
    assert f"  extra ({extra}): 30 of 30 dropped" in table and "    missing_image: 30" in table
    assert [t.strip().split(":")[:2] for t in table if t.startswith("      ")] == \
        [[str(extra), "1"], [str(extra), "2"], [str(extra), "3"]]


@pytest.mark.parametrize("bad, fails", [(1, False), (2, True)])
def test_a_dataset_over_its_own_budget(tmp_path, processor, in_root, bad, fails):
    """100 records, 1 or 2 broken lines, data.max_bad_fraction=0.01: 1% passes, 2% stops."""
    rows = DEMO_DATA.read_text().splitlines()[:100]
    rows[:bad] = ["{broken"] * bad
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    over = [f"data.datasets=[{{path: '{path}', image_root: '{DEMO_DATA.parent}'}}]"]
    cat = catmod.build_catalog(recipes.load(DEMO, over), processor)
    errors = drops.budget_errors(cat, 0.01)
    assert bool(errors) == fails
    if fails:
        assert f"{bad} of 100 samples dropped (2.0%, more than data.max_bad_fraction=0.01)" in errors[0]


def test_too_long_reports_the_length_that_keeps_them(processor, in_root):
    small = catmod.build_catalog(recipes.load(DEMO, ["data.packing.max_packed_tokens=64"]), processor)
    full = catmod.build_catalog(recipes.load(DEMO, ["data.packing.max_packed_tokens=4096"]), processor)
    longest = max(s.length for s in full.samples)             # measured with room for all
    too_long = sorted(s.length for s in full.samples if s.length > 64)
    (row,) = drops.per_dataset(small)
    assert row["reasons"]["too_long"]["count"] == len(too_long) == small.dropped["too_long"]
    assert row["reasons"]["too_long"]["need"] == longest
    assert f"    too_long: {len(too_long)} (needs data.packing.max_packed_tokens >= {longest})" \
        in drops.table_lines(small)
    kept = catmod.build_catalog(recipes.load(DEMO, [f"data.packing.max_packed_tokens={longest}"]),
                                processor)
    assert "too_long" not in kept.dropped


def test_train_prints_the_table_and_stops_before_training(tmp_path):
    """The CLI end to end: a second dataset whose image_root is wrong stops the run before the
    first step, with one error line naming it; the table came first; nothing was trained.
    (The run goes into a previous run's folder with --overwrite, which clears what vlmft wrote
    there and nothing else, before anything loads.)"""
    (tmp_path / "nowhere").mkdir()
    over, extra = _two_datasets(tmp_path, _image_rows(20), str(tmp_path / "nowhere"))
    out = tmp_path / "run"
    (out / "checkpoints" / "step40").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 40}\n')
    (out / "notes.txt").write_text("mine")
    p = vlmft("train", str(DEMO), *over, f"output_dir={out}", "train.max_steps=2", "--overwrite")
    assert f"vlmft: --overwrite: removed checkpoints, metrics.jsonl from {out}" in p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt"]
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error dataset 'extra' ({extra}): all 20 samples")
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert lines.index("    missing_image: 20") < lines.index(errors[0])


def _corrupt(png_path):
    """Keep a PNG's header and IEND (planning reads them) but zero its compressed data (with a
    valid CRC), so the image fails only when decoded."""
    import struct
    import zlib

    png = bytearray(png_path.read_bytes())
    k = png.index(b"IDAT")
    n = struct.unpack(">I", png[k - 4:k])[0]
    png[k + 4:k + 4 + n] = bytes(n)
    png[k + 4 + n:k + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(n)))
    png_path.write_bytes(bytes(png))


@pytest.mark.parametrize("planning_drops, stops", [(0, False), (2, True)])
def test_training_budget_counts_planning_drops_and_materialization_together(
        tmp_path, in_root, processor, planning_drops, stops, dist_env):
    """data.max_bad_fraction=0.05 over 40 records read. Planning drops 0 or 2 broken lines
    (2 <= 0.05 x 40: the per-dataset check passes); one more sample fails when materialized in
    step 1 (8 samples: no packing, 4 x 2 per step). Counted together against samples read:
    1 of 48 passes, 3 of 48 stops. Counting the materialized samples alone (1 of 8) would stop
    both; leaving the planning drops out (1 of 48) would stop neither."""
    import shutil

    from vlmft.data.stream import PackPlan
    from vlmft.train import train

    rows = [json.loads(line) for line in _image_rows(40)]
    for i, row in enumerate(rows):
        row["image"] = str(tmp_path / f"img{i}.png")
        shutil.copy(ROOT / "demo" / "data" / "images" / "001_blue_square.png", row["image"])
    lines = [json.dumps(row) for row in rows]
    if planning_drops:
        lines[-planning_drops:] = ["{broken"] * planning_drops
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = recipes.load(DEMO, [f"data.datasets=[{{path: '{path}'}}]", "data.packing.enabled=false",
                            "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_steps=1",
                            "data.max_bad_fraction=0.05", f"output_dir={tmp_path / 'run'}"])
    cat = catmod.build_catalog(r, processor)
    assert len(cat.records) == 40 and len(cat.samples) == 40 - planning_drops
    first = PackPlan(r, cat).step(0, 1)[0][0]                 # a sample of step 1
    _corrupt(tmp_path / cat.records[cat.samples[first].record].data["image"])
    if stops:
        with pytest.raises(recipes.RecipeError, match=r"3 of 48 samples read were bad"):
            train(r)
    else:
        result = train(r)
        assert result.steps == 1 and result.dropped == {"corrupt_image": 1}
