"""Read training records: conversation JSONL, a JSON array of records, and InternVL meta JSON.

A record is one sample, in the LLaVA/InternVL format::

    {"image": "a.png" | ["a.png", "b.jpg"],          # optional; relative to image_root
     "conversations": [{"from": "system|human|gpt", "value": "<image>\\nWhat is it?"}, ...]}

or in the ``messages`` format (TRL, ms-swift, OpenAI-style chat data)::

    {"messages": [{"role": "system|user|assistant",
                   "content": "<image>What is it?" | [{"type": "text", "text": "What is it?"},
                                                      {"type": "image", "image": "a.png"}]}],
     "images": ["a.png"]}                             # for placeholders / parts without a path

where an image part names its file as ``image``, ``path``, ``url`` or OpenAI's
``image_url: {"url": ...}`` (a local path or ``file://``; remote URLs are not fetched), or takes
the next of the record's ``images`` when it names none; ``<image>`` in string content takes the
next of ``images`` too.

A ``.jsonl`` file holds one record per line. A ``.json`` file holding a JSON array of records
(LLaVA's own distribution format, e.g. ``llava_v1_5_mix665k.json``) is read once, in chunks
(vlmft/data/json_array.py), each record's text kept for the lazy parse below; a record is cited
as ``file:line (record i)``, its first line and its index in the array. A ``.json`` file holding an object is a meta JSON.

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
from urllib.parse import unquote

from ..recipe import DatasetConfig, RecipeError
from . import json_array

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PLACEHOLDER = "<image>"
IMAGE_PARTS = ("image", "image_url", "input_image")


class BadSample(Exception):
    """A record we cannot train on. ``reason`` is the counted key (see catalog.REASONS);
    ``need``: for too_long / too_many_tiles, the limit that would have kept it."""

    def __init__(self, reason: str, detail: str = "", need: int = 0):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.need = need

    def __reduce__(self):  # picklable across worker processes
        return (BadSample, (self.reason, self.detail, self.need))


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
        if path.suffix == ".json" and json_array.first_char(path) != "[":
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
    if isinstance(meta, dict) and ("conversations" in meta or "messages" in meta):
        raise RecipeError([f"{key}: {path} holds a single record; give a JSON array of records "
                           "[{...}, {...}] or a JSONL file with one record per line"])
    if not isinstance(meta, dict) or not meta:
        raise RecipeError([f"{key}: {path}: a .json dataset is a JSON array of records "
                           '[{"conversations": ...}, ...] or an InternVL meta JSON mapping dataset '
                           'names to {"root": ..., "annotation": ...}'])
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
    if ds.annotation.suffix == ".json":
        records = [Record(dataset_index, f"{ds.annotation}:{line} (record {k})", line=text)
                   for k, (line, text) in enumerate(json_array.records(ds.annotation, limit))]
        return apply_repeat(records, ds.repeat_time, seed + dataset_index)
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

    ``conversations`` (LLaVA/InternVL) or ``messages`` (role/content). InternVL's rule for
    images without a placeholder: they go before the first user text. Around a placeholder, the
    newline that follows it is dropped (it belongs to the image)."""
    if "conversations" not in record and "messages" in record:
        return _message_turns(record)
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("missing_key", "'conversations' (or 'messages') must be a non-empty list")
    for t in conv:
        if type(t) is not dict or "from" not in t or "value" not in t:
            raise BadSample("missing_key", "each turn needs 'from' and 'value'")
        if type(t["value"]) is not str:
            raise BadSample("missing_key", "'value' must be a string")
    imgs = _image_list(record, "image")
    roles = [_role(t["from"]) for t in conv]
    return _placeholder_turns(roles, [t["value"] for t in conv], imgs), imgs


def _image_list(record: dict, *keys: str) -> list[str]:
    imgs = next((record[k] for k in keys if k in record), [])
    imgs = [imgs] if isinstance(imgs, str) else imgs
    if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
        raise BadSample("missing_key", f"'{keys[0]}' must be a path or a list of paths")
    return imgs


def _role(name) -> str:
    role = ROLES.get(name) if isinstance(name, str) else None
    if role is None:
        raise BadSample("unknown_role", f"'{name}' (expected system, human or gpt; or user, assistant)")
    return role


def _placeholder_turns(roles: list[str], values: list[str], imgs: list[str]):
    """Turns from texts holding '<image>' placeholders, one per image of ``imgs``."""
    n_placeholders = sum(v.count(PLACEHOLDER) for v in values)
    if n_placeholders == 0 and imgs:
        first = next((k for k, r in enumerate(roles) if r == "user"), None)
        if first is not None:
            values = list(values)
            values[first] = PLACEHOLDER * len(imgs) + "\n" + values[first]
            n_placeholders = len(imgs)
    if n_placeholders != len(imgs):
        raise BadSample("image_count_mismatch", f"{n_placeholders} '<image>' placeholders, {len(imgs)} images")
    out = []
    for role, v in zip(roles, values):
        if PLACEHOLDER not in v:
            out.append((role, [v] if v.strip("\n") else []))
            continue
        if role != "user":
            raise BadSample("image_count_mismatch", f"'<image>' in a {role} turn")
        content: list[str | None] = []
        for k, p in enumerate(v.split(PLACEHOLDER)):
            if k:
                content.append(None)
            if p.strip("\n") or (p and content):   # text after an image loses leading newlines
                content.append(p.lstrip("\n") if content else p)
        out.append((role, content))
    if "assistant" not in roles:
        raise BadSample("no_supervised_tokens", "no assistant (gpt) turn")
    return out


def _message_turns(record: dict):
    """The ``messages`` format: when every content is a string, the placeholder rules with the
    record's ``images``; else each content is a list of parts (a string is one text part) whose
    texts and images keep their order, an image part without a path (or '<image>' in a text)
    taking the next of ``images``."""
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise BadSample("missing_key", "'messages' must be a non-empty list")
    for m in msgs:
        if type(m) is not dict or "role" not in m or "content" not in m:
            raise BadSample("missing_key", "each message needs 'role' and 'content'")
        if not isinstance(m["content"], (str, list)):
            raise BadSample("missing_key", "'content' must be a string or a list of parts")
    pool = _image_list(record, "images", "image")
    roles = [_role(m["role"]) for m in msgs]
    if all(isinstance(m["content"], str) for m in msgs):
        return _placeholder_turns(roles, [m["content"] for m in msgs], pool), pool
    out, imgs, taken = [], [], 0
    for role, m in zip(roles, msgs):
        content: list[str | None] = []
        for part in [m["content"]] if isinstance(m["content"], str) else m["content"]:
            text, image = _part(part)
            pieces = text.split(PLACEHOLDER) if text is not None else ["", ""]
            for k, piece in enumerate(pieces):
                if k:  # an image: this part's own, or the next of 'images'
                    if role != "user":
                        raise BadSample("image_count_mismatch", f"an image in a {role} message")
                    if image is None:
                        if taken == len(pool):
                            raise BadSample("image_count_mismatch", "more images without a path "
                                            f"than the {len(pool)} listed in 'images'")
                        image, taken = pool[taken], taken + 1
                    content.append(None)
                    imgs.append(image)
                    image, piece = None, piece.lstrip("\n")
                if piece:
                    content.append(piece)
        out.append((role, content))
    if taken != len(pool):
        raise BadSample("image_count_mismatch", f"'images' lists {len(pool)}, the messages use {taken}")
    if "assistant" not in roles:
        raise BadSample("no_supervised_tokens", "no assistant message")
    return out, imgs


def _part(part) -> tuple[str | None, str | None]:
    """(text, None) for a text part, (None, path or None) for an image part."""
    if isinstance(part, str):
        return part, None
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "input_text") and isinstance(part.get("text"), str):
        return part["text"], None
    if kind not in IMAGE_PARTS:
        raise BadSample("missing_key", f"a content part of type {kind!r}: expected "
                        "{'type': 'text', 'text': ...} or {'type': 'image', 'image': PATH}")
    for key in ("image", "path", "url", "image_url"):
        ref = part.get(key)
        ref = ref.get("url") if isinstance(ref, dict) else ref
        if isinstance(ref, str) and ref:
            if ref.startswith("file://"):  # file:///abs/a.png, file://rel/a.png
                return None, unquote(ref[7:].removeprefix("localhost/"))
            if ref.startswith(("http://", "https://", "data:")):
                raise BadSample("missing_image", f"{ref[:60]}: remote and inline images are not "
                                "fetched; download the image and give its path")
            return None, ref
    return None, None
