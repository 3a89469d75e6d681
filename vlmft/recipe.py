"""The recipe: loading, overrides and validation (the schema is in vlmft/recipe_schema.py).

A recipe is a YAML file read with OmegaConf plus ``key.path=value`` overrides from the command
line. The schema is written once, as dataclasses (vlmft/recipe_schema.py, every class
importable from here too); the string under each field is its help text (read back by
:func:`field_docs`; ``vlmft recipe [SECTION]`` prints it with the defaults, ``vlmft recipe
--init`` writes a commented starting recipe from it).

Overrides are OmegaConf dot-lists applied to the file's tree, so list items are addressed by
index: ``data.datasets.0.path=train.jsonl`` (or ``data.datasets[0].path=...``).

Validation (vlmft/validation.py, which does not import this module) collects *every* problem before anything heavy is imported (no torch, no deepspeed:
``vlmft`` answers a bad recipe in well under 2 s) and reports each as ``key.path: message``,
with the file line, the valid choices, or a did-you-mean for unknown keys. The CLI prints them
and exits with code 2.

Relative paths (data files, model folders, ``output_dir``) are taken from the current directory,
like every shell command; run from the repository root for the bundled recipes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from .recipe_schema import (CheckpointConfig, DataConfig, DatasetConfig, EngineConfig, EvalConfig,
                            EvalDatasetConfig, FreezeConfig, LayerDecayConfig, LogConfig, LoraConfig,
                            LoraTargetsConfig, LossConfig, ModelConfig, OptimConfig, PackingConfig,
                            Recipe, ScheduleConfig, TrainConfig, choice)
from .type_check import check_section
from .validation import semantic_checks

__all__ = ["CheckpointConfig", "DataConfig", "DatasetConfig", "EngineConfig", "EvalConfig",
           "EvalDatasetConfig", "FreezeConfig", "LayerDecayConfig", "LogConfig", "LoraConfig",
           "LoraTargetsConfig", "LossConfig", "ModelConfig", "OptimConfig", "PackingConfig", "Recipe",
           "RecipeError", "ScheduleConfig", "TrainConfig", "bracketed", "choice", "field_docs", "load",
           "override_problem", "to_dict", "to_yaml", "yaml_lines"]

# ----------------------------------------------------------------------------------------------
# Errors


class RecipeError(ValueError):
    """A recipe problem the user can fix. ``errors`` holds one ``key.path: message`` per line."""

    def __init__(self, errors: list[str], source: str = ""):
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(f"{head}{len(errors)} problem(s) in the recipe:\n" + "\n".join(errors))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a schema dataclass: its help text, as ``vlmft recipe``
    prints it."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ----------------------------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides, validate; raise RecipeError listing
    every problem (``key.path: message``, with the file line where there is one)."""
    errors: list[str] = []
    raw: dict = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "<overrides>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError([f"{path}: recipe file not found"], source)
        try:
            loaded = OmegaConf.load(p)
        except Exception as exc:  # YAML syntax: OmegaConf/yaml say where
            raise RecipeError([f"{path}: not valid YAML: {exc}"], source) from None
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise RecipeError([f"{path}: the top level must be a mapping of sections"], source)
        raw = OmegaConf.to_container(loaded, resolve=False)
        lines = yaml_lines(p)
    bad = [o for o in overrides if "=" not in o]
    for o in bad:
        errors.append(f"{o}: an override must look like key.path=value")
    good = [o for o in overrides if "=" in o]
    for o in good:  # a value from the command line is not on the file's line
        key = bracketed(o.split("=", 1)[0].lstrip("+~"))
        lines = {k: v for k, v in lines.items() if k != key and not k.startswith(key + ".")
                 and not k.startswith(key + "[")}
    if good:
        conf = OmegaConf.create(raw)
        for o in good:  # one at a time, so each bad one is named
            try:
                conf.merge_with_dotlist([o])
            except Exception as exc:
                errors.append(override_problem(o, raw, exc))
        raw = OmegaConf.to_container(conf)
    try:
        raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as exc:  # a bad ${interpolation}
        raise RecipeError([f"interpolation: {exc}"], source) from None
    train = raw.get("train")
    if isinstance(train, dict) and train.get("epochs") and "max_steps" not in train:
        train["max_steps"] = 0  # from the data: vlmft/data/epochs.py turns epochs into steps
    check_section(raw, Recipe, "", errors)
    if errors:
        raise RecipeError(_with_lines(errors, lines, source), source)
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), raw))
    errors = semantic_checks(recipe)
    if errors:
        raise RecipeError(_with_lines(errors, lines, source), source)
    return recipe


def _with_lines(errors: list[str], lines: dict[str, int], source: str) -> list[str]:
    out = []
    for err in errors:
        key = err.split(":", 1)[0]
        out.append(f"{source}:{lines[key]}: {err}" if key in lines else err)
    return out


def yaml_lines(path: Path) -> dict[str, int]:
    """key.path -> 1-based line in the YAML file, for error messages."""
    out: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[f"{prefix}[{i}]"] = v.start_mark.line + 1
                walk(v, f"{prefix}[{i}]")

    try:
        walk(yaml.compose(path.read_text()), "")
    except yaml.YAMLError:
        pass
    return out


def bracketed(key: str) -> str:
    """``data.datasets.0.path`` -> ``data.datasets[0].path`` (how errors and lines name keys)."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)


def override_problem(override: str, raw: dict, exc: Exception) -> str:
    """One line for an override OmegaConf could not apply: an index past a list's end, a list
    addressed by name, or OmegaConf's own first line."""
    key = override.split("=", 1)[0]
    node, path = raw, []
    for part in re.split(r"\.|\[|\]\.?", key.lstrip("+~")):
        if isinstance(node, list):
            where = ".".join(path)
            if not part.isdigit():
                return f"{key}: {where} is a list; address an item by its index, e.g. {where}.0"
            if int(part) >= len(node):
                return (f"{key}: {where} has {len(node)} item(s) (indices from 0); to add one, "
                        f"give the whole list: {where}=[{{...}}, {{...}}]")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            break
        path.append(part)
    return f"{override}: cannot apply this override: {str(exc).splitlines()[0]}"


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (saved next to checkpoints, compared on resume)."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
