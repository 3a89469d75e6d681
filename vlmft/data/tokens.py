"""A sample's segments as token counts (the plan) and as tensors (the encoding), through its
model family's processor.

Both passes expand images the same way: the family's processor turns each image into the text
its placeholder becomes (``Family.expand``: its own ``_process_images`` and
``replace_image_token``; this includes any text around the image tokens, such as Gemma 3's
``\\n\\n<start_of_image>...<end_of_image>\\n\\n`` or Idefics3's row and column tags), and that text
is tokenized with the rest of its segment. The plan does it on a blank image of the size the
file's header gives (cached per processor, size and tile limit), the encoding on the decoded
image; so the planned length is the encoded length, and :func:`encode` raises
``BadSample("plan_mismatch")`` the day it is not (never a silent cut of an answer).

Counting is fast: runs of the image token (an added token, so a run of n is n ids) are
collapsed to one before tokenizing and added back; texts are tokenized many at a time,
deduplicated and cached (chat.py renders the segments).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

from ..models import family_of
from ..loss import IGNORE_INDEX
from ..models.base import blank_image, collapse_runs
from . import images as imageio
from .chat import BadSample, Segment


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
    labels: list[int]              # token id where supervised, -100 elsewhere (not yet shifted)
    vision: dict = field(default_factory=dict)   # the family's per-image tensors of the sample
    token_row: list[int] | None = None           # the family's per-token ids (mm_token_type_ids, ...)
    tiles: int = 0


# ---------------------------------------------------------------- caches per processor

class _Cache:
    def __init__(self, processor):
        fam = family_of(processor)
        self.family = fam
        self.image_token = processor.image_token
        added = processor.tokenizer.get_added_vocab() if hasattr(processor.tokenizer, "get_added_vocab") else {}
        self.collapse = self.image_token in added   # a run of n added tokens is n ids
        self.images: dict[tuple, tuple[str, int]] = {}   # (h, w, max_tiles) -> (replacement, tiles)
        self.texts: dict[str, int] = {}
        self.image_ids = fam.image_token_ids(processor)
        self.lock = threading.Lock()


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache(processor) -> _Cache:
    try:
        c = _CACHES.get(processor)
        if c is None:
            c = _CACHES[processor] = _Cache(processor)
        return c
    except TypeError:  # not weak-referenceable
        return _Cache(processor)


def image_cost(processor, path, max_tiles: int = 0) -> tuple[str, int]:
    """(replacement text, tiles) of the image at ``path``, from its header size alone."""
    c = _cache(processor)
    key = imageio.size(path) + (max_tiles,)
    hit = c.images.get(key)
    if hit is None:
        with c.lock:
            e = c.family.expand(processor, [blank_image(*key[:2])], max_tiles)
        hit = c.images[key] = (e.replacements[0], e.tiles[0])
    return hit


def image_ids(processor) -> set[int]:
    return _cache(processor).image_ids


# ---------------------------------------------------------------- planning

def _count(processor, c: _Cache, texts: list[str]) -> list[int]:
    """Token count of each text, tokenized one batch at a time (deduplicated, cached)."""
    cache = c.texts
    if len(cache) > 200_000:
        cache.clear()
    keyed = []
    for t in texts:
        extra = 0
        if c.collapse and c.image_token in t:
            t, extra = collapse_runs(t, c.image_token)
        keyed.append((t, extra))
    todo = list({t: None for t, _ in keyed if t not in cache})
    if todo:
        tok = processor.tokenizer
        backend = getattr(tok, "_tokenizer", None)
        if (hasattr(backend, "encode_batch_fast") and backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))):
            # what tok(todo, add_special_tokens=False) runs, minus offsets and per-row dicts
            counts = map(len, backend.encode_batch_fast(todo, add_special_tokens=False))
        else:
            counts = map(len, tok(todo, add_special_tokens=False, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"])
        cache.update(zip(todo, counts))
    return [cache[t] + extra for t, extra in keyed]


def planned_texts(processor, segs: list[Segment], max_tiles: int) -> tuple[list[str], int, int]:
    """Each segment's text with its images expanded as the processor will expand them, the
    sample's tiles and images. ImageProblem when an image is bad."""
    c = _cache(processor)
    out, tiles, n = [], 0, 0
    for seg in segs:
        if not seg.images:
            out.append(seg.text)
            continue
        costs = [image_cost(processor, p, max_tiles) for p in seg.images]
        out.append(c.family.expand_text(processor, seg.text, [r for r, _ in costs]))
        tiles += sum(t for _, t in costs)
        n += len(costs)
    return out, tiles, n


def plan_many(processor, items: list[tuple[list[Segment], int]]) -> list[Plan | Exception]:
    """Plans of many samples (segments, max_tiles), their text tokenized in one batch. A
    sample whose image is bad comes back as its ImageProblem instead of a Plan."""
    c = _cache(processor)
    texts, heads = [], []
    for segs, max_tiles in items:
        try:
            ts, tiles, n = planned_texts(processor, segs, max_tiles)
        except imageio.ImageProblem as exc:
            heads.append(exc)
            continue
        heads.append((segs, tiles, n))
        texts += ts
    counts = iter(_count(processor, c, texts))
    out = []
    for h in heads:
        if isinstance(h, Exception):
            out.append(h)
            continue
        segs, tiles, n = h
        lens = [next(counts) for _ in segs]
        out.append(Plan(length=sum(lens), tiles=tiles, num_images=n,
                        n_supervised=sum(k for k, s in zip(lens, segs) if s.supervised)))
    return out


def truncated_plan(processor, segs: list[Segment], max_tiles: int, max_len: int) -> Plan | None:
    """The plan of the first max_len tokens, as :func:`truncate` will cut them: None when the
    cut would fall inside or before an image span, or leave no supervised token."""
    c = _cache(processor)
    texts, tiles, nimg = planned_texts(processor, segs, max_tiles)
    pos = sup = last_image = 0
    for seg, text in zip(segs, texts):
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        hits = [i for i, t in enumerate(ids) if t in c.image_ids]
        if hits:
            last_image = pos + hits[-1] + 1   # one past the last image token
        if seg.supervised and pos < max_len:
            sup += min(len(ids), max_len - pos)
        pos += len(ids)
    if last_image > max_len or sup == 0:
        return None
    return Plan(length=min(pos, max_len), tiles=tiles, n_supervised=sup, num_images=nimg)


# ---------------------------------------------------------------- encoding

def encode(processor, segs: list[Segment], max_tiles: int = 0, expected: int | None = None) -> Encoded:
    """Token ids, labels and the family's tensors of one sample. ``expected``: its planned
    length; a different length raises BadSample("plan_mismatch")."""
    c = _cache(processor)
    fam = c.family
    paths = [p for s in segs for p in s.images]
    exp = fam.expand(processor, [imageio.load(p) for p in paths], max_tiles) if paths else None
    texts, k = [], 0
    for seg in segs:
        n = len(seg.images)
        texts.append(fam.expand_text(processor, seg.text, exp.replacements[k:k + n]) if n else seg.text)
        k += n
    ids, labels, sup = [], [], []
    batch = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    for seg, seg_ids in zip(segs, batch):
        ids += seg_ids
        labels += [t if seg.supervised and t not in c.image_ids else IGNORE_INDEX for t in seg_ids]
        sup += [seg.supervised] * len(seg_ids)
    if expected is not None and len(ids) != expected:
        raise BadSample("plan_mismatch", f"planned {expected} tokens, encoded {len(ids)}: the processor "
                        "expands this sample's images differently from the plan (please report the model)")
    return Encoded(ids, labels, exp.vision if exp else {}, fam.token_row(processor, ids, sup),
                   sum(exp.tiles) if exp else 0)


def truncate(enc: Encoded, max_len: int, image_token_ids: set[int]) -> Encoded | None:
    """Keep the first max_len tokens if that cuts no image span (every image lies wholly before
    the cut) and some supervised token remains; otherwise None (the sample is dropped)."""
    last_image = max((i for i, t in enumerate(enc.input_ids) if t in image_token_ids), default=-1)
    if last_image >= max_len or not any(lab != IGNORE_INDEX for lab in enc.labels[:max_len]):
        return None
    row = enc.token_row[:max_len] if enc.token_row is not None else None
    return Encoded(enc.input_ids[:max_len], enc.labels[:max_len], enc.vision, row, enc.tiles)
