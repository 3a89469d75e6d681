"""The type walk: a raw recipe mapping checked against the schema's dataclass annotations.

Unknown keys (with a did-you-mean), values of the wrong type, values outside a field's choices:
every problem is appended as ``key.path: message``. Works on any schema dataclass; imports
neither torch nor the recipe modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any


def _check_value(value, tp, key: str, errors: list[str]):
    """Check ``value`` against the annotation ``tp``; recurse into dataclasses, lists and dicts."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # e.g. int or str ("auto"): the value must fit one of them
        trials = [[] for _ in typing.get_args(tp)]
        for t, errs in zip(typing.get_args(tp), trials):
            _check_value(value, t, key, errs)
        if all(trials):
            names = " or ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(tp))
            errors.append(f"{key}: expected {names}, got {value!r}")
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return
        check_section(value, tp, key, errors)
    elif origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return
        (item_tp,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_value(v, item_tp, f"{key}[{i}]", errors)
    elif origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return
        _, val_tp = typing.get_args(tp)
        if val_tp is not Any:
            for k, v in value.items():
                _check_value(v, val_tp, f"{key}.{k}", errors)
    elif tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")


def check_section(raw: dict, cls: type, prefix: str, errors: list[str]):
    """Check the mapping ``raw`` against the fields of the schema dataclass ``cls`` (keys under
    ``prefix``): unknown keys, types, choices."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            errors.append(f"{key}: unknown key; {hint}")
            continue
        f = fields[k]
        before = len(errors)
        _check_value(v, hints[k], key, errors)
        choices = f.metadata.get("choices")
        if choices and len(errors) == before and v not in choices:
            errors.append(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
