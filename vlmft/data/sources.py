"""Read training records: conversation JSONL and InternVL meta JSON.

A JSONL line is one sample in the LLaVA/InternVL format::

    {"image": "a.png" | ["a.png", "b.jpg"],          # optional; relative to image_root
     "conversations": [{"from": "system|human|gpt", "value": "<image>\\nWhat is it?"}, ...]}

An InternVL meta JSON maps dataset names to ``{"root": images folder, "annotation": JSONL,
"repeat_time": float, "data_augment": bool, "max_dynamic_patch": int, "length": int}``;
each entry becomes one dataset (``length`` is InternVL's hint and is not needed here). Relative
``root`` and ``annotation`` paths are taken from the meta file's folder, or from the current
directory when only that one exists (InternVL's own meta files name paths from the directory
training starts in). ``repeat_time`` below 1 takes a seeded random subset, above 1 repeats
(the integer part whole copies, the fraction a seeded random subset); a meta entry's
repeat_time is multiplied by the recipe entry's. ``max_dynamic_patch`` caps the tiles of that
dataset's images; ``data_augment`` is read and reported (vlmft does no augmentation).

Lines are parsed lazily (:attr:`Record.data`): reading a file only splits it into lines, and
the JSON is decoded where the record is planned (in the catalog's worker processes when there
are many). Bad lines are not fatal here: ``Record.error`` names the reason (``invalid_json``)
so the caller can count it under ``data.on_bad_sample`` and cite ``file:line``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..recipe import DatasetConfig, RecipeError

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PLACEHOLDER = "<image>"


class BadSample(Exception):
    """A record we cannot train on. ``reason`` is the counted key (see catalog.REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes
        return (BadSample, (self.reason, self.detail))


@dataclass
class Dataset:
    name: str
    annotation: Path
    image_root: Path
    repeat_time: float = 1.0
    loss_weight: float = 1.0
    max_dynamic_patch: int = 0      # 0 = the recipe's/processor's
    data_augment: bool = False      # read and reported; vlmft does no augmentation


class Record:
    """One line of a dataset: where it is, and its JSON object (decoded on first use).

    ``error`` is set (``invalid_json``, with ``detail``) when the line is not a JSON object."""

    __slots__ = ("dataset", "where", "_line", "_data", "_error", "_detail")

    def __init__(self, dataset: int, where: str, data: dict | None = None, error: str = "",
                 detail: str = "", line: bytes | None = None):
        self.dataset, self.where = dataset, where   # index into the dataset list; "file:line"
        self._line, self._data, self._error, self._detail = line, data, error, detail

    def _parse(self) -> None:
        line, self._line = self._line, None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            self._error, self._detail = "invalid_json", f"{exc.msg} (column {exc.colno})"
            return
        except UnicodeDecodeError as exc:
            self._error, self._detail = "invalid_json", f"not UTF-8 text ({exc.reason} at byte {exc.start})"
            return
        if not isinstance(obj, dict):
            self._error, self._detail = "invalid_json", f"a JSON {type(obj).__name__}, not an object"
            return
        self._data = obj

    @property
    def data(self) -> dict | None:
        if self._line is not None:
            self._parse()
        return self._data

    @property
    def error(self) -> str:
        if self._line is not None:
            self._parse()
        return self._error

    @property
    def detail(self) -> str:
        if self._line is not None:
            self._parse()
        return self._detail

    def __repr__(self) -> str:
        return f"Record({self.dataset}, {self.where!r}, error={self.error!r})"


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
        where = f"{key}: {path}: entry '{name}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            errors.append(f"{where} needs an 'annotation' JSONL path")
            continue
        ann = _rel(path.parent, entry["annotation"])
        if not ann.is_file():
            errors.append(f"{where}: annotation '{entry['annotation']}' not found (relative paths "
                          f"are from {path.parent} or the current directory)")
        root = entry.get("root", "") or ""
        if c.image_root:
            image_root = Path(c.image_root).expanduser()
        elif not isinstance(root, str):
            errors.append(f"{where}: 'root' must be a folder path, got {root!r}")
            continue
        else:
            image_root = _rel(path.parent, root) if root else ann.parent
        try:
            repeat = float(entry.get("repeat_time", 1.0))
            mdp = int(entry.get("max_dynamic_patch", 0) or 0)
        except (TypeError, ValueError):
            errors.append(f"{where}: 'repeat_time' must be a number and 'max_dynamic_patch' an integer")
            continue
        if repeat <= 0 or mdp < 0:
            errors.append(f"{where}: 'repeat_time' must be > 0 and 'max_dynamic_patch' >= 0")
            continue
        out.append(Dataset(
            name=name, annotation=ann, image_root=image_root, repeat_time=repeat * c.repeat_time,
            loss_weight=c.loss_weight, max_dynamic_patch=mdp,
            data_augment=bool(entry.get("data_augment", False))))
    if errors:
        raise RecipeError(errors)
    return out


def _rel(base: Path, p: str) -> Path:
    """An absolute path as is; a relative one from ``base`` (the meta file's folder), or from
    the current directory when it exists only there."""
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    b = base / q
    return q if not b.exists() and q.exists() else b


def read(dataset_index: int, ds: Dataset, seed: int, limit: int = 0) -> list[Record]:
    """All records of one dataset, after repeat_time, in file order (shuffling is the stream's).
    ``limit`` > 0 reads only the first ``limit`` records (before repeat_time)."""
    records = []
    prefix = f"{ds.annotation}:"
    with open(ds.annotation, "rb") as f:
        for n, line in enumerate(f, 1):
            if limit and len(records) >= limit:
                break
            if line.isspace():
                continue
            records.append(Record(dataset_index, prefix + str(n), line=line))
    return apply_repeat(records, ds.repeat_time, seed + dataset_index)


def apply_repeat(items: list, repeat_time: float, seed: int) -> list:
    """InternVL's repeat_time: whole copies for the integer part, a seeded subset for the rest
    (kept in file order)."""
    whole, frac = int(repeat_time), repeat_time - int(repeat_time)
    out = items * whole
    if frac > 0 and items:
        rng = random.Random(seed)
        pick = sorted(rng.sample(range(len(items)), round(len(items) * frac)))
        out += [items[i] for i in pick]
    return out


def turns(record: dict) -> tuple[list[tuple[str, list[str | None]]], list[str]]:
    """A record's conversation as (role, content) turns, content a list of texts and None for
    each image, and its image paths as written; BadSample when the record is unusable.

    InternVL's rule for images without a placeholder: they go before the first human text.
    Around a placeholder, the newline that follows it is dropped (it belongs to the image)."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("missing_key", "'conversations' must be a non-empty list")
    for t in conv:
        if type(t) is not dict or "from" not in t or "value" not in t:
            raise BadSample("missing_key", "each turn needs 'from' and 'value'")
        if type(t["value"]) is not str:
            raise BadSample("missing_key", "'value' must be a string")
    imgs = record.get("image", [])
    imgs = [imgs] if isinstance(imgs, str) else imgs
    if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
        raise BadSample("missing_key", "'image' must be a path or a list of paths")
    values = [t["value"] for t in conv]
    n_placeholders = sum(v.count(PLACEHOLDER) for v in values)
    if n_placeholders == 0 and imgs:
        first = next((k for k, t in enumerate(conv) if t["from"] == "human"), None)
        if first is not None:
            values[first] = PLACEHOLDER * len(imgs) + "\n" + values[first]
            n_placeholders = len(imgs)
    if n_placeholders != len(imgs):
        raise BadSample("image_count_mismatch", f"{n_placeholders} '<image>' placeholders, {len(imgs)} images")
    out, assistant = [], False
    for t, v in zip(conv, values):
        role = ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            raise BadSample("unknown_role", f"'{t['from']}' (expected system, human or gpt)")
        assistant = assistant or role == "assistant"
        if PLACEHOLDER not in v:
            out.append((role, [v] if v.strip("\n") else []))
            continue
        if role != "user":
            raise BadSample("image_count_mismatch", f"'<image>' in a {t['from']} turn")
        content: list[str | None] = []
        for k, p in enumerate(v.split(PLACEHOLDER)):
            if k:
                content.append(None)
            if p.strip("\n") or (p and content):   # text after an image loses leading newlines
                content.append(p.lstrip("\n") if content else p)
        out.append((role, content))
    if not assistant:
        raise BadSample("no_supervised_tokens", "no gpt turn")
    return out, imgs
