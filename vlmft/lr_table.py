"""``vlmft lr-table``: what the optimizer will do to every parameter, without weights.

The model is built from its config on the meta device (:func:`vlmft.model.meta_model`: names and
shapes, no memory), planned by :func:`vlmft.optim.plan` with the recipe's ``optim`` section,
and each trainable parameter's lr at ``step`` is ``optim.lr x lr_scale x lr_factor(step)``
(frozen ones show lr 0). Nothing here imports deepspeed.

``by``: ``param`` (one row per tensor), ``layer`` (one row per tower and layer id) or ``group``
(one row per optimizer group, plus one ``frozen`` row). The ``groups`` entry of the table is the
same in every view and is what a DeepSpeed engine's ``optimizer.param_groups`` should show
(tests/test_optim_deepspeed.py compares them: name, lr, weight_decay).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

from .optim import ParamRow, plan
from .recipe import Recipe
from .schedule import lr_factor

VIEWS = ("param", "layer", "group")


def lr_table(recipe: Recipe, step: int = 0, by: str = "param") -> dict:
    """The table for a recipe's model (built on the meta device from its config)."""
    from .model import meta_model

    return table_for_model(meta_model(recipe.model), recipe, step=step, by=by)


def table_for_model(model, recipe: Recipe, step: int = 0, by: str = "param") -> dict:
    """The same table for a model already built (any device; weights are not read)."""
    if by not in VIEWS:
        raise ValueError(f"by: {by!r} is not one of {', '.join(VIEWS)}")
    rows, groups = plan(model, recipe.optim)
    factor = lr_factor(step, recipe.schedule, recipe.train.max_steps)
    base = recipe.optim.lr * factor
    params = [_param_row(r, base) for r in rows]
    group_rows = []
    for i, g in enumerate(groups):
        members = [p for p in params if p["group"] == i]
        group_rows.append({"group": i, "name": g["name"], "lr": base * g["lr_scale"],
                           "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                           "tensors": len(members), "numel": sum(p["numel"] for p in members)})
    trainable = [r for r in rows if not r.frozen]
    decayed = sum(r.numel for r in trainable if r.weight_decay > 0)
    totals = {"total": sum(r.numel for r in rows), "trainable": sum(r.numel for r in trainable),
              "frozen": sum(r.numel for r in rows if r.frozen), "decayed": decayed,
              "non_decayed": sum(r.numel for r in trainable) - decayed,
              "tensors": len(rows), "groups": len(groups)}
    if by == "param":
        out = params
    elif by == "layer":
        out = _by_layer(params)
    else:
        out = _by_group(params, group_rows)
    return {"model": recipe.model.name_or_path, "step": step, "lr_factor": factor, "by": by,
            "rows": out, "groups": group_rows, "totals": totals}


def _param_row(r: ParamRow, base: float) -> dict:
    return {"name": r.name, "module": r.module, "shape": list(r.shape), "numel": r.numel,
            "tower": r.tower, "layer_id": r.layer_id, "lr_scale": r.lr_scale,
            "lr": 0.0 if r.frozen else base * r.lr_scale, "weight_decay": r.weight_decay,
            "frozen": r.frozen, "group": r.group, "reason": r.reason}


def _aggregate(name: str, members: list[dict], **extra) -> dict:
    live = [p for p in members if not p["frozen"]]
    return {"name": name, "module": ", ".join(sorted({p["module"] for p in members})),
            "shape": None, "numel": sum(p["numel"] for p in members), "tensors": len(members),
            **extra,
            "lr": max((p["lr"] for p in live), default=0.0),
            "lr_min": min((p["lr"] for p in live), default=0.0),
            "weight_decay": max((p["weight_decay"] for p in live), default=0.0),
            "frozen": not live, "frozen_numel": sum(p["numel"] for p in members if p["frozen"]),
            "group": sorted({p["group"] for p in live})}


def _by_layer(params: list[dict]) -> list[dict]:
    keyed: dict[tuple, list[dict]] = defaultdict(list)
    for p in params:
        keyed[(p["tower"], p["layer_id"])].append(p)
    return [_aggregate(f"{tower}[{lid}]" if lid is not None else str(tower), members,
                       tower=tower, layer_id=lid)
            for (tower, lid), members in keyed.items()]


def _by_group(params: list[dict], group_rows: list[dict]) -> list[dict]:
    keyed: dict = defaultdict(list)
    for p in params:
        keyed[p["group"]].append(p)
    out = []
    for g in group_rows + ([{"group": None, "name": "frozen"}] if None in keyed else []):
        members = keyed[g["group"]]
        layers = defaultdict(set)
        for p in members:
            layers[p["tower"]].add(p["layer_id"])
        where = " ".join(f"{t}[{_span(ids)}]" for t, ids in layers.items())
        out.append(_aggregate(g["name"], members, tower=",".join(layers), layer_id=None,
                              layers=where))
        if g["group"] is not None:
            out[-1].update(lr=g["lr"], lr_min=g["lr"], weight_decay=g["weight_decay"],
                           group=g["group"])
        else:
            out[-1]["group"] = None
    return out


def _span(ids) -> str:
    ids = sorted(i for i in ids if i is not None)
    if not ids:
        return ""
    runs, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b is None or b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return ",".join(runs)


def to_csv(table: dict) -> str:
    """The rows as CSV (lists space-joined, None empty)."""
    rows = table["rows"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in fields})
    return buf.getvalue()


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return v


def render(table: dict):
    """A rich Table of the rows with the totals as caption (the CLI prints it)."""
    from rich.table import Table

    by = table["by"]
    cols = {"param": ["name", "module", "shape", "tower", "layer_id", "lr", "weight_decay",
                      "group", "reason"],
            "layer": ["name", "tower", "layer_id", "numel", "lr", "lr_min", "weight_decay",
                      "frozen", "group"],
            "group": ["name", "layers", "tensors", "numel", "lr", "weight_decay"]}[by]
    t = table["totals"]
    caption = (f"step {table['step']} (lr x{table['lr_factor']:.4g}); trainable {t['trainable']:,} "
               f"(decayed {t['decayed']:,}, not decayed {t['non_decayed']:,}); frozen "
               f"{t['frozen']:,}; {t['groups']} optimizer groups")
    out = Table(title=f"lr-table: {table['model']}", caption=caption)
    for c in cols:
        out.add_column(c, justify="right" if c in ("numel", "lr", "lr_min", "tensors") else "left")
    for r in table["rows"]:
        out.add_row(*(_fmt(c, r.get(c)) for c in cols))
    return out


def _fmt(col, v) -> str:
    if v is None:
        return "-"
    if col in ("lr", "lr_min"):
        return f"{v:.3e}"
    if col == "numel":
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if col == "shape" else ",".join(map(str, v))
    return str(v)
