"""The recipe schema as documentation: ``vlmft recipe [SECTION]`` and ``vlmft recipe --init``.

Both read the dataclasses of vlmft/recipe_schema.py (types, defaults, choices) and the help text
under each field (:func:`vlmft.recipe.field_docs`), so they cannot drift from what ``load``
accepts. :func:`starter` is a commented recipe: every key with its help text, the essential ones
set (to the bundled demo, so the file loads as written from the repository root), every other
one commented out at its default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
import typing

import yaml

from .recipe import DatasetConfig, EvalDatasetConfig, Recipe, field_docs

# keys a starting recipe sets; the rest are written commented out at their defaults
ESSENTIAL = ("output_dir", "model.name_or_path", "data.datasets", "data.eval", "train.max_steps", "optim.lr")
STARTER_DATASET = DatasetConfig(path="demo/data/train.jsonl")
STARTER_ENTRIES = {"data.datasets": STARTER_DATASET, "data.eval": EvalDatasetConfig(path="demo/data/eval.jsonl")}
STARTER_HEAD = """\
# A vlmft recipe. `vlmft recipe [SECTION]` prints every key with its type, default and help.
# Set the model and the data to yours; keys commented out ('# key: value') show the default,
# uncomment one to change it. Relative paths are taken from the directory vlmft runs in.
"""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "section"
    if origin is list:
        (item,) = typing.get_args(tp)
        return "list of entries" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _yaml(value) -> str:
    """A value as YAML writes it inline (the same text a recipe would hold)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _walk(cls, obj, prefix: str):
    """(key, type, value, field) for every field, depth first; list-of-entries fields then the
    fields of one entry (key ``path.0.field`` shown as ``path[].field``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp, value = prefix + f.name, hints[f.name], getattr(obj, f.name)
        yield key, tp, value, f, cls
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, value, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item = typing.get_args(tp)[0]
            yield from _walk(item, item(), key + "[].")


def schema(section: str | None = None) -> list[dict]:
    """Rows ``{key, type, default, choices, help}`` of the whole schema or of one section
    (``optim``, ``data.packing``, ``data.datasets``); ValueError for an unknown section."""
    rows = [{"key": key, "type": _type_name(tp),
             "default": None if _type_name(tp) in ("section", "list of entries") else _yaml(value),
             "choices": list(f.metadata.get("choices", ())), "help": field_docs(cls)[f.name]}
            for key, tp, value, f, cls in _walk(Recipe, Recipe(), "")]
    if not section:
        return rows
    want = re.sub(r"\[\d*\]|\.\d+(?=\.|$)", "", section).strip(".")  # data.datasets[0].path
    picked = [r for r in rows if r["key"].replace("[]", "") == want
              or r["key"].replace("[]", "").startswith(want + ".")]
    if not picked:
        keys = sorted({r["key"].replace("[]", "") for r in rows})
        close = difflib.get_close_matches(want, keys, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "sections: " + ", ".join(
            r["key"] for r in rows if "." not in r["key"] and r["type"] == "section")
        raise ValueError(f"recipe: no key or section '{section}'; {hint}")
    return picked


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=max(40, 96 - len(indent)))]


def _lines(cls, obj, prefix: str, indent: str, on: bool) -> list[str]:
    """The YAML lines of one section; ``on`` False writes every key commented out."""
    out = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        active = on and any(e == key or e.startswith(key + ".") for e in ESSENTIAL)
        mark = "" if active else "# "
        out += _comment(docs[f.name], indent)
        if dataclasses.is_dataclass(tp):
            out.append(f"{indent}{mark}{f.name}:")
            out += _lines(tp, getattr(obj, f.name), key + ".", indent + "  ", active)
        elif key in STARTER_ENTRIES:
            entry = STARTER_ENTRIES[key]
            out.append(f"{indent}{mark}{f.name}:")
            item = _lines(type(entry), entry, key + "[].", indent + "    ", False)
            first = next(i for i, line in enumerate(item) if "# path:" in line)
            out += [line.replace("    ", "  ", 1) for line in item[:first]]  # path's help
            out.append(f"{indent}  {mark}- path: {_yaml(entry.path)}")
            out += item[first + 1:]
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.append(f"{indent}# {f.name}:")        # e.g. data.eval: one entry, every key commented
            item = typing.get_args(tp)[0]
            lines = _lines(item, item(), key + "[].", indent + "    ", False)
            head = f"{indent}    # {dataclasses.fields(item)[0].name}: "
            first = next(i for i, line in enumerate(lines) if line.startswith(head))
            out += [line.replace("    ", "  ", 1) for line in lines[:first]]
            out.append(lines[first].replace(f"{indent}    # ", f"{indent}  # - ", 1))
            out += lines[first + 1:]
        else:
            out.append(f"{indent}{mark}{f.name}: {_yaml(getattr(obj, f.name))}")
    return out


def starter() -> str:
    """The commented starting recipe ``vlmft recipe --init`` prints."""
    return STARTER_HEAD + "\n".join(_lines(Recipe, Recipe(), "", "", True)) + "\n"
