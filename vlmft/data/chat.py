"""Turn a conversation record into token ids and labels with the model's own chat template.

Labels: exactly the assistant turns' content and their end-of-turn token are supervised; the
system, user and template text, the newline after end-of-turn, and every image token are not.
The spans come from the template itself: for assistant turn i, the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])`` (trailing
whitespace cut) is that turn's answer. This works for any prefix-stable template (ChatML as in
InternVL and Qwen, Llama, ...) and is checked, not assumed.

Each text segment is tokenized on its own (the boundaries sit after the generation prompt and
after end-of-turn tokens, where BPE cannot merge across anyway); segments that hold images go
through the processor, which expands each image placeholder to its image tokens.

Two passes, the same code:
- :func:`plan` reads image sizes from file headers and asks the processor how many tokens and
  tiles each image becomes: the sample's length without decoding a pixel (for the packer).
- :func:`encode` decodes the images and returns the tensors; its length equals the plan's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import images as imageio

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PLACEHOLDER = "<image>"


class BadSample(Exception):
    """A record we cannot train on. ``reason`` is the counted key (see stream.BAD_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Segment:
    text: str
    supervised: bool
    images: list[Path] = field(default_factory=list)


@dataclass
class Plan:
    """What the packer needs, computed without decoding pixels."""
    length: int
    tiles: int
    n_supervised: int
    num_images: int


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]            # token id where supervised, -100 elsewhere (not yet shifted)
    pixel_values: object = None  # torch tensor [tiles, 3, H, W] or None
    tiles: int = 0


def messages(record: dict, image_root: Path) -> tuple[list[dict], list[Path]]:
    """LLaVA/InternVL record -> chat messages (content lists with image items) and image paths."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("missing_key", "'conversations' must be a non-empty list")
    imgs = record.get("image", [])
    imgs = [imgs] if isinstance(imgs, str) else imgs
    if not isinstance(imgs, list) or not all(isinstance(p, str) for p in imgs):
        raise BadSample("missing_key", "'image' must be a path or a list of paths")
    paths = [Path(p) if Path(p).is_absolute() else image_root / p for p in imgs]
    n_placeholders = sum(t.get("value", "").count(PLACEHOLDER) for t in conv if isinstance(t, dict))
    if n_placeholders == 0 and paths:
        # InternVL's rule: an image without a placeholder goes before the first human text.
        conv = [dict(t) for t in conv]
        first = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
        if first is not None:
            first["value"] = PLACEHOLDER * len(paths) + "\n" + str(first.get("value", ""))
            n_placeholders = len(paths)
    if n_placeholders != len(paths):
        raise BadSample("image_count_mismatch", f"{n_placeholders} '<image>' placeholders, {len(paths)} images")
    out = []
    for t in conv:
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise BadSample("missing_key", "each turn needs 'from' and 'value'")
        role = ROLES.get(t["from"])
        if role is None:
            raise BadSample("unknown_role", f"'{t['from']}' (expected system, human or gpt)")
        if not isinstance(t["value"], str):
            raise BadSample("missing_key", "'value' must be a string")
        if role != "user" and PLACEHOLDER in t["value"]:
            raise BadSample("image_count_mismatch", f"'<image>' in a {t['from']} turn")
        parts = [p for p in re.split(f"({re.escape(PLACEHOLDER)})", t["value"])]
        content = []
        for p in parts:
            if p == PLACEHOLDER:
                content.append({"type": "image"})
            elif p.strip("\n") or (p and content):
                content.append({"type": "text", "text": p.lstrip("\n") if content else p})
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadSample("no_supervised_tokens", "no gpt turn")
    return out, paths


def segments(processor, msgs: list[dict], paths: list[Path]) -> list[Segment]:
    """Split the rendered conversation into supervised / unsupervised text, images attached."""
    def render(ms, gen=False):
        return processor.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    full = render(msgs)
    cuts, pos = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(render(msgs[:i], gen=True)) if i else 0
        end = len(render(msgs[: i + 1]).rstrip())
        if start < pos or end > len(full) or not full.startswith(render(msgs[: i + 1]).rstrip()):
            raise BadSample("template", "the chat template is not prefix-stable; cannot find the "
                            "assistant spans (please report the model)")
        cuts.append((start, end))
        pos = end
    out, pos, img_iter = [], 0, iter(paths)
    image_token = processor.image_token
    for s, e in cuts + [(len(full), len(full))]:
        for text, sup in ((full[pos:s], False), (full[s:e], True)):
            if text:
                n = text.count(image_token)
                out.append(Segment(text, sup, [next(img_iter) for _ in range(n)]))
        pos = e
    return out


def _images_kwargs(processor, max_tiles: int) -> dict:
    if max_tiles and hasattr(processor.image_processor, "max_patches"):
        return {"max_patches": max_tiles}
    return {}


def _text_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def plan(processor, segs: list[Segment], max_tiles: int = 0) -> Plan:
    length = tiles = sup = nimg = 0
    for seg in segs:
        n = len(_text_ids(processor, seg.text))
        if seg.images:
            sizes = [imageio.size(p) for p in seg.images]
            mm = processor._get_num_multimodal_tokens(image_sizes=sizes, **_images_kwargs(processor, max_tiles))
            # each placeholder token becomes num_image_tokens tokens
            n += sum(mm.num_image_tokens) - len(sizes)
            tiles += sum(getattr(mm, "num_image_patches", None) or [1] * len(sizes))
            nimg += len(sizes)
        length += n
        sup += n if seg.supervised else 0
    return Plan(length=length, tiles=tiles, n_supervised=sup, num_images=nimg)


def encode(processor, segs: list[Segment], max_tiles: int = 0) -> Encoded:
    import torch

    ids, labels, pixels = [], [], []
    image_ids = set(_special_image_ids(processor))
    for seg in segs:
        if seg.images:
            imgs = [imageio.load(p) for p in seg.images]
            out = processor(text=[seg.text], images=imgs, return_tensors="pt",
                            **_images_kwargs(processor, max_tiles))
            seg_ids = out["input_ids"][0].tolist()
            pixels.append(out["pixel_values"])
        else:
            seg_ids = _text_ids(processor, seg.text)
        ids += seg_ids
        labels += [t if seg.supervised and t not in image_ids else -100 for t in seg_ids]
    pv = torch.cat(pixels) if pixels else None
    return Encoded(ids, labels, pv, 0 if pv is None else pv.shape[0])


def _special_image_ids(processor) -> list[int]:
    ids = getattr(processor, "image_token_ids", None)
    if ids:
        return list(ids)
    return [processor.tokenizer.convert_tokens_to_ids(processor.image_token)]


def truncate(enc: Encoded, max_len: int, image_ids: set[int]) -> Encoded | None:
    """Keep the first max_len tokens if that cuts no image span (every image lies wholly before
    the cut) and some supervised token remains; otherwise None (the sample is dropped)."""
    last_image = max((i for i, t in enumerate(enc.input_ids) if t in image_ids), default=-1)
    if last_image >= max_len or not any(lab != -100 for lab in enc.labels[:max_len]):
        return None
    return Encoded(enc.input_ids[:max_len], enc.labels[:max_len], enc.pixel_values, enc.tiles)
