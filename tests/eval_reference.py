"""Reference losses for the evaluation and per-dataset tests, sharing no code with vlmft's loss
path: a sample alone through the model's own forward, its images through the stock image
processor (black images of the same size for the blank-image loss), the cross-entropy of its
supervised tokens summed here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_ce(processor, model, record: dict, root, blank: bool = False) -> tuple[float, int]:
    """(sum of the supervised tokens' cross-entropy, their number) of one record alone."""
    from PIL import Image

    from vlmft.data import chat

    msgs, paths = chat.messages(record, root)
    imgs = [Image.open(p).convert("RGB") for p in paths]
    if blank:
        imgs = [Image.new("RGB", im.size, (0, 0, 0)) for im in imgs]
    ids, labels, k = [], [], 0
    for seg in chat.segments(processor, msgs, paths):
        text = seg.text
        if seg.images:   # the stock processor's expansion of this segment's images
            mine = imgs[k:k + len(seg.images)]
            k += len(seg.images)
            out = processor(text=[text], images=mine, add_special_tokens=False)
            text = processor.tokenizer.decode(out["input_ids"][0])
        t = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if seg.supervised else [-100] * len(t)
    vision = {}
    if imgs:   # every image-processor output the model's forward takes (LLaVA-NeXT: image_sizes too)
        import inspect

        accepted = inspect.signature(model.forward).parameters
        vision = {k: v for k, v in processor.image_processor(imgs, return_tensors="pt").items() if k in accepted}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, **vision).logits[0]
    targets = torch.tensor(labels[1:])
    sup = targets != -100
    return float(F.cross_entropy(logits[:-1][sup].double(), targets[sup], reduction="sum")), int(sup.sum())


def weight(n: int, reduction: str) -> float:
    """w(n) of the reduction, written from its definition."""
    return {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]


def reduced(samples: list[tuple[float, int]], reduction: str, d: list[float] | None = None) -> float:
    """sum_s d_s w(n_s) CE_s / sum_s d_s w(n_s) n_s."""
    d = d or [1.0] * len(samples)
    num = sum(ds * weight(n, reduction) * ce for ds, (ce, n) in zip(d, samples))
    den = sum(ds * weight(n, reduction) * n for ds, (_, n) in zip(d, samples))
    return num / den
