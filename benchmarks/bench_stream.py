"""The data stream end to end, and `vlmft pack-stats` on 100,000 samples.

1. stream: read JSONL -> chat template + tokenize + plan (catalog, image headers only) -> pack
   (the recipe's best_fit) -> collate every pack (``Materializer.micro_batch``: decode the JPEG
   photos, tile them to 448x448 with InternVL's image processor, expand image tokens, build the
   row tensors), all in ONE process. Figure: packed tokens per second of wall time, planning
   included (target >= 20,000 per worker process).
2. pack-stats: ``vlmft pack-stats RECIPE --data 100k.jsonl --json`` as a subprocess (imports,
   reading, planning with its worker pool, packing with three strategies and offline BFD),
   timed from the outside (target < 60 s).

Everything is generated here, deterministically (seed 0), with nothing downloaded: photos of
640x480-class sizes drawn with pillow and saved as JPEG; conversations in the LLaVA/InternVL
format (70% one image, 10% two images, 20% text only, varied question and answer lengths); a
processor folder like InternVL2.5's (GotOcr2ImageProcessorPil, 448-pixel tiles, crop_to_patches,
max_patches 6, image_seq_length 256, the demo's ChatML template and BPE tokenizer).

    .venv/bin/python benchmarks/bench_stream.py              # both, prints a table
    .venv/bin/python benchmarks/bench_stream.py --json       # the same figures as JSON
    .venv/bin/python benchmarks/bench_stream.py --only stream --stream-samples 600
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(640, 480), (480, 640), (640, 427), (800, 600), (512, 384), (640, 360), (600, 600)]
WORDS = ("the a of picture image shows left right near far above below red green blue small large "
         "person car tree house street dog cat table window sign sky water road building light "
         "two three many some every colour shape count read text what where which how why is are "
         "there this that with without in on at behind front side corner middle top bottom").split()
TILE, SEQ, MAX_PATCHES = 448, 256, 6


def make_photos(out: Path, n: int = 32, seed: int = 0) -> list[str]:
    """n JPEG 'photos' (gradients, shapes, noise), 640x480-class sizes; names relative to out."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        name = f"photos/{i:03d}_{w}x{h}.jpg"
        names.append(name)
        if (out / name).is_file():
            continue
        c0 = [rng.randint(0, 255) for _ in range(3)]
        c1 = [rng.randint(0, 255) for _ in range(3)]
        grad = Image.linear_gradient("L").resize((w, h))
        img = Image.composite(Image.new("RGB", (w, h), tuple(c0)), Image.new("RGB", (w, h), tuple(c1)), grad)
        d = ImageDraw.Draw(img)
        for _ in range(40):
            x0, y0 = rng.randint(0, w), rng.randint(0, h)
            x1, y1 = x0 + rng.randint(10, w // 3), y0 + rng.randint(10, h // 3)
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        noise = Image.effect_noise((w, h), 40).convert("RGB")
        img = Image.blend(img, noise, 0.15).filter(ImageFilter.SMOOTH)
        img.save(out / name, quality=90)
    return names


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_conversations(path: Path, images: list[str], n: int, seed: int = 0) -> Path:
    """n records in the LLaVA/InternVL format naming the given images (paths relative to the
    JSONL's folder): 70% one image, 10% two, 20% text only."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            kind = rng.random()
            if kind < 0.7:
                rec = {"id": i, "image": rng.choice(images), "conversations": [
                    {"from": "human", "value": "<image>\n" + _words(rng, 4, 30) + "?"},
                    {"from": "gpt", "value": _words(rng, 2, 80) + "."}]}
            elif kind < 0.8:
                a, b = rng.sample(images, 2)
                rec = {"id": i, "image": [a, b], "conversations": [
                    {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\n" + _words(rng, 4, 20) + "?"},
                    {"from": "gpt", "value": _words(rng, 2, 40) + "."}]}
            else:
                turns = [{"from": "system", "value": "You answer briefly."}] if rng.random() < 0.3 else []
                for _ in range(rng.randint(1, 3)):
                    turns += [{"from": "human", "value": _words(rng, 5, 60) + "?"},
                              {"from": "gpt", "value": _words(rng, 5, 200) + "."}]
                rec = {"id": i, "conversations": turns}
            f.write(json.dumps(rec) + "\n")
    return path


def make_model_folder(out: Path) -> Path:
    """A processor folder like InternVL2.5's (448 tiles, 256 tokens a tile) plus its config;
    pack-stats and the stream need only the processor, so no weights are written."""
    if (out / "config.json").is_file():
        return out
    from transformers import InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from transformers import InternVLProcessor

    from vlmft.demo_assets import CHAT_TEMPLATE, make_tokenizer
    from vlmft.models import image_only

    corpus = ["system user assistant " + " ".join(WORDS)] * 4 + [_words(random.Random(k), 5, 50) for k in range(400)]
    tok = make_tokenizer(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                         extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    ip = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                  min_patches=1, max_patches=MAX_PATCHES)
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=SEQ,
                                         chat_template=CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>"))
    out.mkdir(parents=True, exist_ok=True)
    proc.save_pretrained(out)
    InternVLConfig(text_config=dict(model_type="qwen2", vocab_size=len(tok)),
                   image_token_id=tok.context_image_token_id, image_seq_length=SEQ).save_pretrained(out)
    return out


def write_recipe(path: Path, model: Path, data: Path, max_tokens: int) -> Path:
    path.write_text(f"model:\n  name_or_path: {model}\ndata:\n  datasets:\n    - path: {data}\n"
                    f"  packing:\n    max_packed_tokens: {max_tokens}\ntrain:\n  micro_batch_size: 1\n"
                    "  grad_accum_steps: 1\n  seed: 0\n")
    return path


def bench_stream(work: Path, n: int, max_tokens: int) -> dict:
    """One process: plan, pack and collate every pack of n samples; packed tokens per second."""
    from vlmft import recipe as recipes
    from vlmft.data.catalog import build_catalog
    from vlmft.data.stream import Materializer, PackPlan
    from vlmft.model import load_processor

    model = make_model_folder(work / "model")
    data = make_conversations(work / f"stream_{n}.jsonl", make_photos(work), n, seed=1)
    recipe = recipes.load(write_recipe(work / "stream.yaml", model, data, max_tokens))
    processor = load_processor(recipe.model)
    import torch

    torch.set_num_threads(1)  # one worker process = one core
    t0 = time.perf_counter()
    catalog = build_catalog(recipe, processor, workers=1)
    t1 = time.perf_counter()
    packs = PackPlan(recipe, catalog).epoch(0)
    t2 = time.perf_counter()
    mat = Materializer(recipe, catalog, processor)
    tokens = tiles = 0
    for p in packs:
        mb = mat.micro_batch([p])
        tokens += mb["input_ids"].shape[1]
        tiles += 0 if mb["vision"] is None else mb["vision"]["pixel_values"].shape[0]
    t3 = time.perf_counter()
    return {"samples": n, "packs": len(packs), "packed_tokens": tokens, "tiles": tiles,
            "max_packed_tokens": max_tokens, "plan_s": t1 - t0, "pack_s": t2 - t1,
            "collate_s": t3 - t2, "total_s": t3 - t0, "tokens_per_s": tokens / (t3 - t0),
            "collate_tokens_per_s": tokens / (t3 - t2), "tiles_per_s": tiles / (t3 - t0),
            "samples_per_s": len(catalog.samples) / (t3 - t0)}


def bench_pack_stats(work: Path, n: int, max_tokens: int) -> dict:
    """`vlmft pack-stats --data` on n samples, timed as a subprocess from start to exit."""
    model = make_model_folder(work / "model")
    data = work / f"pack_stats_{n}.jsonl"
    if not data.is_file():
        make_conversations(data, make_photos(work), n, seed=2)
    recipe = write_recipe(work / "pack_stats.yaml", model, data, max_tokens)
    t = time.perf_counter()
    p = subprocess.run([str(Path(sys.executable).parent / "vlmft"), "pack-stats", str(recipe),
                        "--data", str(data), "--json"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"pack-stats failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads(p.stdout)
    return {"samples": s["num_samples"], "used": s["num_used"], "wall_s": wall,
            "plan_s": s["plan_seconds"], "planning_samples_per_s": s["samples_per_second"],
            "packs": s["num_packs"], "lower_bound": s["lower_bound_packs"], "fill": s["fill_ratio"],
            "strategies": {k: v["fill_ratio"] for k, v in s["strategies"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("stream", "pack-stats"))
    ap.add_argument("--stream-samples", type=int, default=400)
    ap.add_argument("--pack-stats-samples", type=int, default=100_000)
    ap.add_argument("--max-packed-tokens", type=int, default=8192)
    ap.add_argument("--workdir", help="keep generated files here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = {"machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"}
        if a.only in (None, "stream"):
            res["stream"] = bench_stream(work, a.stream_samples, a.max_packed_tokens)
        if a.only in (None, "pack-stats"):
            res["pack_stats"] = bench_pack_stats(work, a.pack_stats_samples, a.max_packed_tokens)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(res["machine"])
    if "stream" in res:
        s = res["stream"]
        print(f"\nstream, one process, {s['samples']} samples -> {s['packs']} packs of <= "
              f"{s['max_packed_tokens']} tokens ({s['tiles']} tiles of 448x448)")
        print("| stage | seconds | packed tokens/s |\n|---|---|---|")
        print(f"| plan (read, template, tokenize, headers) | {s['plan_s']:.2f} | |")
        print(f"| pack (best_fit) | {s['pack_s']:.3f} | |")
        print(f"| collate (decode, tile, tokenize, tensors) | {s['collate_s']:.2f} | {s['collate_tokens_per_s']:,.0f} |")
        print(f"| **whole stream** | {s['total_s']:.2f} | **{s['tokens_per_s']:,.0f}** |")
    if "pack_stats" in res:
        s = res["pack_stats"]
        print(f"\nvlmft pack-stats --json, {s['samples']:,} samples ({s['used']:,} used)")
        print("| wall (process start to exit) | planning | planning samples/s | packs (LB) | fill |\n|---|---|---|---|---|")
        print(f"| {s['wall_s']:.1f} s | {s['plan_s']:.1f} s | {s['planning_samples_per_s']:,.0f} | "
              f"{s['packs']:,} ({s['lower_bound']:,}) | {s['fill'] * 100:.3f}% |")
        print("fill by strategy: " + ", ".join(f"{k} {v * 100:.3f}%" for k, v in s["strategies"].items()))


if __name__ == "__main__":
    main()
