"""Build the bundled demo: a tiny InternVL model folder and a small image-conversation dataset.

    python -m vlmft.demo_assets demo      # writes demo/model and demo/data (deterministic)

Nothing is downloaded. The model is transformers' own ``InternVLForConditionalGeneration``
(InternViT-style vision tower, Qwen2 text tower) built from a config; the tokenizer is a
byte-level BPE trained here on the demo's text with InternVL's image tokens; the image processor
is ``GotOcr2ImageProcessorPil``, the one InternVL checkpoints use, with 28-pixel tiles. The
folder is saved with ``save_pretrained`` and read back with ``from_pretrained``, exactly like a
real checkpoint.

The data is a learnable toy task in the LLaVA/InternVL conversation format: pillow draws a shape
of some colour on a background; questions ask for the colour, the shape or (multi-image) which of
two images holds a given colour; text-only samples do arithmetic in words.
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
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

# ChatML, as InternVL2.5/3 and Qwen use; images render as the processor's <IMG_CONTEXT> token,
# which the processor expands to <img> + image_seq_length x tiles context tokens + </img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TILE = 28            # pixels per tile side
IMAGE_SEQ_LENGTH = 4  # tokens per tile: (28 / 7)^2 patches x 0.5^2 pixel shuffle


def _draw(rng: random.Random, color: str, shape: str, path: Path) -> None:
    from PIL import Image, ImageDraw
    w, h = rng.choice([(40, 30), (56, 56), (64, 48), (90, 60), (120, 90), (30, 60)])
    bg = rng.choice([(250, 250, 250), (200, 200, 200), (30, 30, 30)])
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    m = min(w, h)
    x0, y0 = rng.randint(0, w - m // 2), rng.randint(0, h - m // 2)
    box = (x0, y0, x0 + m // 2, y0 + m // 2)
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


def _images(rng: random.Random, out: Path, count: int, prefix: str = "") -> list[tuple[str, str, str]]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        name = f"images/{prefix}{i:03d}_{color}_{shape}.{'jpg' if i % 3 == 0 else 'png'}"
        _draw(rng, color, shape, out / name)
        images.append((name, color, shape))
    return images


def _rows(rng: random.Random, images: list, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = i % 6
        if kind in (0, 1):
            name, color, shape = rng.choice(images)
            rows.append({"id": i, "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the shape?"},
                {"from": "gpt", "value": f"The {shape} is {color}."}]})
        elif kind == 2:
            name, color, shape = rng.choice(images)
            rows.append({"id": i, "image": name, "conversations": [
                {"from": "system", "value": "You describe pictures briefly."},
                {"from": "human", "value": "<image>\nWhat shape do you see?"},
                {"from": "gpt", "value": f"A {color} {shape}."},
                {"from": "human", "value": "Is it round?"},
                {"from": "gpt", "value": "Yes." if shape == "circle" else "No."}]})
        elif kind == 3:
            (a, ca, _), (b, cb, _) = rng.sample(images, 2)
            rows.append({"id": i, "image": [a, b], "conversations": [
                {"from": "human", "value": f"Image 1: <image>\nImage 2: <image>\nWhich image shows {ca}?"},
                {"from": "gpt", "value": "Image 1." if ca != cb else "Both."}]})
        else:
            x, y = rng.randint(0, 5), rng.randint(0, 5)
            rows.append({"id": i, "conversations": [
                {"from": "human", "value": f"What is {NUMBERS[x]} plus {NUMBERS[y]}?"},
                {"from": "gpt", "value": f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."}]})
    return rows


def make_data(out: Path, n: int = 240, seed: int = 0) -> Path:
    """Write out/images/*.png|jpg and out/train.jsonl; return the JSONL path."""
    rng = random.Random(seed)
    rows = _rows(rng, _images(rng, out, 48), n)
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_eval_data(out: Path, n: int = 60, seed: int = 1) -> Path:
    """Held-out questions of the same kinds on 24 new images (out/images/eval_*), never seen in
    training: out/eval.jsonl (the demo recipe's data.eval)."""
    rng = random.Random(seed)
    rows = _rows(rng, _images(rng, out, 24, "eval_"), n)
    path = out / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def make_model(out: Path, corpus: list[str], seed: int = 0) -> Path:
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from transformers import InternVLProcessor

    from .models import image_only

    tokenizer = make_tokenizer(corpus)
    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE},
                                               crop_to_patches=True, min_patches=1, max_patches=4)
    processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                       image_seq_length=IMAGE_SEQ_LENGTH, chat_template=CHAT_TEMPLATE)
    config = InternVLConfig(
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=96, image_size=[TILE, TILE], patch_size=[7, 7]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, use_cache=False,
                         tie_word_embeddings=False),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build(root: Path) -> None:
    data = make_data(root / "data")
    make_eval_data(root / "data")
    corpus = ["system user assistant"] + [
        turn["value"].replace("<image>", "") for line in data.read_text().splitlines()
        for turn in json.loads(line)["conversations"]]
    make_model(root / "model", corpus)


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
