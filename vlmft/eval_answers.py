"""Answer accuracy on the eval sets: greedy answers (vlmft/generate.py) to the samples whose
reference answer is short, exact match after a light normalization, predictions on disk.

A sample's question is its conversation up to its last assistant turn, whose text is the
reference; the sample is asked when the reference has at most ``eval.max_new_tokens`` tokens
(the first ``eval.max_generate_samples`` such per dataset when that is set). Question j goes to
rank j % world, one sample a row (no packing), each rank answering its own with no collective,
so ranks with different numbers of questions never wait on each other; one all-gather then
brings every answer to every rank. Under ZeRO-3 each rank answers with a full copy of the
weights, gathered once per evaluation (:func:`generation_model`; it needs the memory of one
whole model per rank).

Exact match compares :func:`normalize`\\ d texts: lower case, runs of whitespace as one space,
surrounding whitespace and punctuation removed ("The circle is red." == "the circle is red").
"""

from __future__ import annotations

import contextlib
import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.chat import messages as record_messages, template_text
from .data.images import ImageProblem
from .data.sources import BadSample
from .distributed import all_gather_lists
from .eval_data import EvalData

PUNCT = string.punctuation + string.whitespace


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(PUNCT)


@dataclass
class Question:
    dataset: int
    id: str                  # the record's "id", else file:line
    messages: list[dict]     # up to the last user turn
    images: list[str]
    reference: str
    max_tiles: int


def questions(data: EvalData, processor, max_new_tokens: int, max_samples: int, max_tiles: int) -> list[Question]:
    """The short-answer questions of every eval set, in dataset then record order."""
    out, per = [], [0] * len(data.names)
    tok = processor.tokenizer
    for ref in data.catalog.samples:
        if max_samples and per[ref.dataset] >= max_samples:
            continue
        rec = data.catalog.records[ref.record]
        ds = data.catalog.datasets[ref.dataset]
        msgs, paths = record_messages(rec.data, ds.image_root)
        last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        reference = "".join(c.get("text", "") for c in msgs[last]["content"]).strip()
        if not reference or len(tok(reference, add_special_tokens=False)["input_ids"]) > max_new_tokens:
            continue
        n_img = sum(c["type"] == "image" for m in msgs[:last] for c in m["content"])
        rid = rec.data.get("id")
        out.append(Question(ref.dataset, str(rid) if rid is not None else rec.where, msgs[:last],
                            paths[:n_img], reference, ds.max_dynamic_patch or max_tiles))
        per[ref.dataset] += 1
    return out


def answer_all(model, processor, qs: list[Question], rank: int, world: int, max_new_tokens: int) -> list[dict]:
    """Every question's prediction (or its error), on every rank, in question order."""
    from .generate import answer

    mine = []
    for j in range(rank, len(qs), world):
        q = qs[j]
        row = {"j": j, "prompt": template_text(processor, q.messages, gen=True), "prediction": None, "error": None}
        try:
            row["prediction"] = answer(model, processor, q.messages, q.images, max_new_tokens, q.max_tiles)
        except (BadSample, ImageProblem) as exc:   # counted and written, never skipped silently
            row["error"] = f"{exc.reason}: {exc.detail}"
        mine.append(row)
    return sorted(all_gather_lists(mine), key=lambda r: r["j"])


def score(data: EvalData, qs: list[Question], preds: list[dict], folder: Path | None) -> dict:
    """{name: {exact_match, answered, answer_errors}}; rank 0 writes folder/NAME.jsonl (id,
    prompt, reference, prediction, match)."""
    out = {n: {"exact_match": None, "answered": 0, "answer_errors": 0} for n in data.names}
    lines = {n: [] for n in data.names}
    hits = [0] * len(data.names)
    for q, p in zip(qs, preds):
        name = data.names[q.dataset]
        match = p["prediction"] is not None and normalize(p["prediction"]) == normalize(q.reference)
        if p["error"]:
            out[name]["answer_errors"] += 1
        else:
            out[name]["answered"] += 1
            hits[q.dataset] += match
        lines[name].append({"id": q.id, "prompt": p["prompt"], "reference": q.reference,
                            "prediction": p["prediction"], "match": match, "error": p["error"]})
    for d, name in enumerate(data.names):
        if out[name]["answered"]:
            out[name]["exact_match"] = hits[d] / out[name]["answered"]
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in lines.items():
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@contextlib.contextmanager
def generation_model(model, zero3: bool):
    """The model to generate with: itself, or under ZeRO-3 a full local copy of its weights."""
    if not zero3:
        yield model
        return
    copy = gathered_copy(model)
    try:
        yield copy
    finally:
        del copy


def gathered_copy(model, group_numel: int = 1 << 27):
    """A plain (unpartitioned) copy of a ZeRO-3 model on this rank: built on the meta device,
    then each parameter gathered (every rank takes part, a group at a time) and cloned into it;
    buffers and other tensors (never partitioned) cloned from the model as they are."""
    import deepspeed

    with torch.device("meta"):
        copy = type(model)(model.config)
    params = list(model.named_parameters(remove_duplicate=False))
    made: dict[int, torch.nn.Parameter] = {}          # tied weights stay tied
    group, size = [], 0
    for i, (name, p) in enumerate(params):
        group.append((name, p))
        size += getattr(p, "ds_numel", p.numel())
        if size >= group_numel or i == len(params) - 1:
            unique = list({id(q): q for _, q in group}.values())
            with deepspeed.zero.GatheredParameters(unique):
                for n, q in group:
                    if id(q) not in made:
                        made[id(q)] = torch.nn.Parameter(q.data.clone(), requires_grad=False)
                    owner, _, leaf = n.rpartition(".")
                    copy.get_submodule(owner)._parameters[leaf] = made[id(q)]
            group, size = [], 0
    for name, mod in copy.named_modules():
        src = model.get_submodule(name)
        for key, b in src._buffers.items():
            mod._buffers[key] = None if b is None else b.clone()
        for key, v in list(vars(mod).items()):   # e.g. a rotary embedding's plain tensors
            if isinstance(v, torch.Tensor) and v.is_meta:
                setattr(mod, key, getattr(src, key).clone())
    return copy.eval()
