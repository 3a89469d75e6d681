"""Build the bundled demo: a tiny LLaVA-NeXT model folder and a learnable image-question task.

    python -m vlmft.demo_assets demo      # writes demo/model and demo/data (deterministic)

Nothing is downloaded. The model is transformers' own ``LlavaNextForConditionalGeneration`` (a
2-layer CLIP vision tower on 28-pixel tiles with "anyres" grids, a Qwen2 text tower) built from a
config; the tokenizer is a byte-level BPE trained here on the demo's text; the processor is the
stock ``LlavaNextProcessor`` (no video part), so ``AutoProcessor`` loads the folder anywhere. The
folder is saved with ``save_pretrained`` and read back with ``from_pretrained``, exactly like a
real checkpoint.

The data, in the LLaVA/InternVL conversation format: pillow draws a shape of some colour on a
background, a fresh image for every question. ``train.jsonl`` asks for the colour or the shape
(short answers; half the records), describes a shape over two turns, asks which of two images
holds a colour, and has text-only arithmetic in words; ``eval.jsonl`` asks colour and shape questions about images
training never saw (answers like ``red.``: exact match measures what the model learned to see).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
          "yellow": (230, 210, 40), "purple": (150, 50, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# ChatML, as Qwen and InternVL use; an image renders as the processor's <image> token, which the
# processor expands to the image's features: a 28-pixel base tile, a grid of tiles and newlines.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TILE = 28                                # pixels per tile side
PATCH = 14                               # CLIP patch: 2 x 2 = 4 tokens a tile
PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # the anyres grids (1x2, 2x1, 2x2 tiles)


def _draw(rng: random.Random, color: str, shape: str, path: Path) -> None:
    from PIL import Image, ImageDraw
    w, h = rng.choice([(40, 30), (56, 56), (64, 48), (90, 60), (120, 90), (30, 60)])
    bg = rng.choice([(250, 250, 250), (200, 200, 200), (30, 30, 30)])
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    m = min(w, h)
    side = rng.randint(m // 2, m - 2)
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    if path.suffix == ".jpg":
        img.save(path, quality=85)
    else:
        img.save(path, optimize=True)


def _image(rng: random.Random, out: Path, name: str, ext: str) -> tuple[str, str, str]:
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    path = f"images/{name}_{color}_{shape}.{ext}"
    _draw(rng, color, shape, out / path)
    return path, color, shape


def _record(rng: random.Random, out: Path, i: int, kind: int) -> dict:
    """One conversation of the given kind (see the module docstring), with fresh images."""
    ext = "jpg" if i % 3 == 0 else "png"
    if kind in (0, 1, 5):
        name, color, shape = _image(rng, out, f"{i:03d}", ext)
        colour = kind == 0 or (kind == 5 and i % 12 == 5)
        q, a = ("What color is the shape?", color) if colour else ("What shape is it?", shape)
        return {"id": i, "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": f"{a}."}]}
    if kind == 2:
        name, color, shape = _image(rng, out, f"{i:03d}", ext)
        return {"id": i, "image": name, "conversations": [
            {"from": "system", "value": "You describe pictures briefly."},
            {"from": "human", "value": "<image>\nWhat shape do you see?"},
            {"from": "gpt", "value": f"A {color} {shape}."},
            {"from": "human", "value": "Is it round?"},
            {"from": "gpt", "value": "Yes." if shape == "circle" else "No."}]}
    if kind == 3:
        (a, ca, _), (b, cb, _) = (_image(rng, out, f"{i:03d}{k}", ext) for k in "ab")
        return {"id": i, "image": [a, b], "conversations": [
            {"from": "human", "value": f"Image 1: <image>\nImage 2: <image>\nWhich image shows {ca}?"},
            {"from": "gpt", "value": "Image 1." if ca != cb else "Both."}]}
    x, y = rng.randint(0, 5), rng.randint(0, 5)
    return {"id": i, "conversations": [
        {"from": "human", "value": f"What is {NUMBERS[x]} plus {NUMBERS[y]}?"},
        {"from": "gpt", "value": f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."}]}


def make_data(out: Path, n: int = 480, heldout: int = 60, seed: int = 0) -> Path:
    """Write out/images/*, out/train.jsonl (kinds cycle 0..5: colour, shape, two-turn, two
    images, arithmetic, colour or shape) and out/eval.jsonl (colour and shape questions on new
    images); return the training JSONL's path."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train = [_record(rng, out, i, i % 6) for i in range(n)]
    held = [dict(_record(rng, out, n + k, k % 2), id=f"h{k}") for k in range(heldout)]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "train.jsonl"


def make_tokenizer(corpus: list[str], special: list[str] = SPECIAL, eos: str = "<|im_end|>",
                   pad: str = "<|endoftext|>", extra: dict | None = None):
    """A byte-level BPE of 384 tokens trained on ``corpus``, with ``special`` as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   extra_special_tokens=extra if extra is not None else {"image_token": "<image>"})


def make_model(out: Path, corpus: list[str], seed: int = 0) -> Path:
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = make_tokenizer(corpus)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                           projection_dim=48),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, use_cache=False,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build(root: Path) -> None:
    data = make_data(root / "data")
    corpus = ["system user assistant"] + [
        turn["value"].replace("<image>", "") for name in ("train.jsonl", "eval.jsonl")
        for line in (data.parent / name).read_text().splitlines()
        for turn in json.loads(line)["conversations"]]
    make_model(root / "model", corpus)


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
