"""Every kind of bad sample is counted under its own reason with file:line, never replaced by
another sample; ``data.on_bad_sample: error`` stops at the first with file:line and the fix."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import zlib

import pytest

from vlmft import recipe as recipes
from vlmft.data import catalog as catmod
from vlmft.data import chat, images, tokens
from vlmft.recipe import RecipeError

from .conftest import DEMO, ROOT, vlmft

REASONS = ["invalid_json", "missing_key", "unknown_role", "image_count_mismatch", "missing_image",
           "empty_image", "corrupt_image", "truncated_image", "image_bomb", "no_supervised_tokens",
           "too_long"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width=20_000, height=20_000) -> bytes:
    """A valid PNG header claiming 400 MP (over pillow's guard) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def truncated_jpeg() -> bytes:
    from PIL import Image

    rng = random.Random(0)
    img = Image.new("RGB", (64, 48))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64 * 48)])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


def conv(q="<image>\nWhat is it?", a="A square.", **extra):
    return {**extra, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def write_bad_dataset(tmp_path):
    """One good image sample, one bad sample of each kind, one good text sample; line -> reason."""
    shutil.copy(ROOT / "demo" / "data" / "images" / "001_blue_square.png", tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    rows = [
        (None, conv(image="good.png")),
        ("invalid_json", '{"image": "good.png", "conversations": [}'),
        ("missing_key", {"image": "good.png"}),
        ("unknown_role", {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}),
        ("image_count_mismatch", conv(q="<image><image> two?", image="good.png")),
        ("missing_image", conv(image="nowhere.png")),
        ("empty_image", conv(image="empty.png")),
        ("corrupt_image", conv(image="notes.png")),
        ("truncated_image", conv(image="cut.jpg")),
        ("image_bomb", conv(image="bomb.png")),
        ("no_supervised_tokens", {"conversations": [{"from": "human", "value": "hello?"}]}),
        ("too_long", conv(q="Count.", a=" ".join(["one two three"] * 120))),
        (None, conv(q="What is two plus two?", a="Four.")),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for _, r in rows))
    return path, {reason: n for n, (reason, _) in enumerate(rows, 1) if reason}


def _recipe(path, *overrides):
    return recipes.load(str(DEMO), [f"data.datasets=[{{path: '{path}'}}]", *overrides])


def test_each_bad_kind_is_counted_once_with_file_and_line(tmp_path, processor, in_root):
    path, lines = write_bad_dataset(tmp_path)
    cat = catmod.build_catalog(_recipe(path), processor)
    assert len(cat.records) == 13 and len(cat.samples) == 2
    assert dict(cat.dropped) == {r: 1 for r in REASONS}
    for reason, line in lines.items():
        (example,) = cat.examples[reason]
        assert example.startswith(f"{path}:{line}: "), (reason, example)
    # the good samples are themselves, not stand-ins
    assert [cat.records[s.record].where for s in cat.samples] == [f"{path}:1", f"{path}:13"]
    assert set(catmod.REASONS) >= set(REASONS)


def test_truncate_keeps_an_overlong_sample_cut_at_a_text_boundary(tmp_path, processor, in_root):
    path, lines = write_bad_dataset(tmp_path)
    cat = catmod.build_catalog(_recipe(path, "data.packing.overlong=truncate"), processor)
    assert "too_long" not in cat.dropped and cat.truncated == 1
    assert cat.truncated_examples[0].startswith(f"{path}:{lines['too_long']}: truncated")
    ref = next(s for s in cat.samples if cat.records[s.record].where.endswith(f":{lines['too_long']}"))
    assert ref.length == 256
    enc = tokens.encode(processor, catmod.segments(processor, cat, cat.records[ref.record]))
    cut = tokens.truncate(enc, ref.length, tokens.image_ids(processor))
    assert len(cut.input_ids) == ref.length
    assert sum(lab != -100 for lab in cut.labels) == ref.n_supervised


@pytest.mark.parametrize("q, cap, keeps", [
    ("<image>\nDescribe.", 60, True),            # image early, cut in the answer
    ("Look: " + "word " * 40 + "<image>", 60, False),   # the cut would split the image
    ("word " * 80 + "?", 60, False),              # nothing supervised before the cut
])
def test_truncated_plan_agrees_with_truncate(processor, q, cap, keeps):
    rec = conv(q=q, a="alpha beta gamma " * 20, image="images/001_blue_square.png")
    segs = chat.sample_segments(processor, rec, ROOT / "demo" / "data")
    p = tokens.truncated_plan(processor, segs, 0, cap)
    enc = tokens.encode(processor, segs)
    assert len(enc.input_ids) > cap
    cut = tokens.truncate(enc, cap, tokens.image_ids(processor))
    assert (p is not None) == keeps == (cut is not None)
    if keeps:
        assert p.length == len(cut.input_ids) == cap
        assert p.n_supervised == sum(lab != -100 for lab in cut.labels)
        assert p.tiles == cut.tiles


def test_a_lower_pixel_guard_makes_a_bomb(tmp_path, processor, in_root, monkeypatch):
    shutil.copy(ROOT / "demo" / "data" / "images" / "001_blue_square.png", tmp_path / "x.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(conv(image="x.png")) + "\n")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    cat = catmod.build_catalog(_recipe(path), processor)
    assert dict(cat.dropped) == {"image_bomb": 1}
    assert "MAX_PIXELS=1000" in cat.examples["image_bomb"][0]
    with pytest.raises(images.ImageProblem) as e:
        images.load(tmp_path / "x.png")
    assert e.value.reason == "image_bomb"


def test_full_decode_refuses_a_truncated_file(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    with pytest.raises(images.ImageProblem) as e:
        images.load(tmp_path / "cut.jpg")
    assert e.value.reason == "truncated_image"


def test_on_bad_sample_error_stops_at_the_first_with_file_line_and_fix(tmp_path, processor, in_root):
    path, _ = write_bad_dataset(tmp_path)
    with pytest.raises(RecipeError) as e:
        catmod.build_catalog(_recipe(path, "data.on_bad_sample=error"), processor)
    (msg,) = e.value.errors
    assert msg.startswith(f"{path}:2: bad sample (invalid_json)")
    assert "fix the line" in msg and "data.on_bad_sample=skip" in msg


def test_pack_stats_cli_counts_every_reason(tmp_path):
    path, lines = write_bad_dataset(tmp_path)
    p = vlmft("pack-stats", str(DEMO), "--data", str(path), "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["num_samples"] == 13 and s["num_used"] == 2
    assert s["dropped"] == {r: 1 for r in sorted(REASONS)}
    for reason, line in lines.items():
        assert s["dropped_examples"][reason][0].startswith(f"{path}:{line}: ")


@pytest.mark.slow
def test_train_cli_on_bad_sample_error_exits_2_with_one_line(tmp_path):
    path, _ = write_bad_dataset(tmp_path)
    p = vlmft("train", str(DEMO), "data.on_bad_sample=error", f"data.datasets=[{{path: '{path}'}}]",
              f"output_dir={tmp_path / 'run'}", timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"{path}:2: bad sample (invalid_json)" in errors[0], p.stderr[-2000:]
