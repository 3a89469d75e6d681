"""Read training records: conversation JSONL and InternVL meta JSON.

A JSONL line is one sample in the LLaVA/InternVL format::

    {"image": "a.png" | ["a.png", "b.jpg"],          # optional; relative to image_root
     "conversations": [{"from": "system|human|gpt", "value": "<image>\\nWhat is it?"}, ...]}

An InternVL meta JSON maps dataset names to ``{"root": images folder, "annotation": JSONL,
"repeat_time": float, "data_augment": bool, "max_dynamic_patch": int, "length": int}``;
each entry becomes one dataset. ``repeat_time`` below 1 takes a seeded random subset, above 1
repeats (InternVL's rule: int part whole copies, the fraction a random subset).

Bad lines are not fatal here: they come back as :class:`Record` with ``error`` set, so the caller
can count them by reason under ``data.on_bad_sample`` and cite ``file:line``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..recipe import DatasetConfig, RecipeError


@dataclass
class Dataset:
    name: str
    annotation: Path
    image_root: Path
    repeat_time: float = 1.0
    loss_weight: float = 1.0
    max_dynamic_patch: int = 0      # 0 = the recipe's/processor's
    data_augment: bool = False      # read and reported; vlmft does no augmentation


@dataclass
class Record:
    dataset: int            # index into the dataset list
    where: str              # "file:line", for messages
    data: dict | None       # the parsed JSON object, None when error
    error: str = ""         # reason key when the line is unusable (e.g. "invalid_json")
    detail: str = ""


def expand(configs: list[DatasetConfig]) -> list[Dataset]:
    """Recipe dataset entries -> datasets, opening InternVL meta JSON files into their entries."""
    out: list[Dataset] = []
    for i, c in enumerate(configs):
        path = Path(c.path).expanduser()
        if path.suffix == ".json":
            out.extend(_meta(path, c, f"data.datasets[{i}].path"))
        else:
            out.append(Dataset(name=c.name or path.stem, annotation=path,
                               image_root=Path(c.image_root).expanduser() if c.image_root else path.parent,
                               repeat_time=c.repeat_time, loss_weight=c.loss_weight))
    return out


def _meta(path: Path, c: DatasetConfig, key: str) -> list[Dataset]:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError([f"{key}: {path}:{exc.lineno}: not valid JSON: {exc.msg}"]) from None
    if not isinstance(meta, dict) or not meta:
        raise RecipeError([f"{key}: {path}: an InternVL meta JSON maps dataset names to "
                           '{"root": ..., "annotation": ...}'])
    out, errors = [], []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            errors.append(f"{key}: {path}: entry '{name}' needs an 'annotation' JSONL path")
            continue
        ann = _rel(path.parent, entry["annotation"])
        if not ann.is_file():
            errors.append(f"{key}: {path}: entry '{name}': annotation '{entry['annotation']}' not found")
        out.append(Dataset(
            name=name, annotation=ann, image_root=_rel(path.parent, entry.get("root", ".")),
            repeat_time=float(entry.get("repeat_time", 1.0)) * c.repeat_time,
            loss_weight=c.loss_weight, max_dynamic_patch=int(entry.get("max_dynamic_patch", 0) or 0),
            data_augment=bool(entry.get("data_augment", False))))
    if errors:
        raise RecipeError(errors)
    return out


def _rel(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def read(dataset_index: int, ds: Dataset, seed: int, limit: int = 0) -> list[Record]:
    """All records of one dataset, after repeat_time, in file order (shuffling is the stream's)."""
    records = []
    with open(ds.annotation, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{ds.annotation}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                records.append(Record(dataset_index, where, None, "invalid_json", exc.msg))
                continue
            if not isinstance(obj, dict):
                records.append(Record(dataset_index, where, None, "invalid_json", "not an object"))
                continue
            records.append(Record(dataset_index, where, obj))
    return apply_repeat(records, ds.repeat_time, seed + dataset_index)


def apply_repeat(items: list, repeat_time: float, seed: int) -> list:
    """InternVL's repeat_time: whole copies for the integer part, a seeded subset for the rest."""
    whole, frac = int(repeat_time), repeat_time - int(repeat_time)
    out = items * whole
    if frac > 0:
        rng = random.Random(seed)
        out += rng.sample(items, round(len(items) * frac))
    return out
