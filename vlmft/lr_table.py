"""``vlmft lr-table``: what the optimizer will do to every parameter, without weights.

The model is built from its config on the meta device (:func:`vlmft.model.meta_model`: names and
shapes, no memory), planned by :func:`vlmft.optim.plan` with the recipe's ``optim`` section,
and each trainable parameter's lr at optimizer step ``step`` is ``optim.lr x lr_scale x
lr_factor(step - 1)`` (frozen ones show lr 0). Steps count from 1 as training's do: step 1 is the
first optimizer step, the ``step`` of metrics.jsonl's first row. Nothing here imports deepspeed.

``by``: ``param`` (one row per tensor), ``layer`` (one row per tower and layer id) or ``group``
(one row per optimizer group, plus one ``frozen`` row). The ``groups`` entry of the table is the
same in every view and is what a DeepSpeed engine's ``optimizer.param_groups`` should show
(tests/test_optim_deepspeed.py compares them: name, lr, weight_decay).

With ``lora.enabled`` the meta model gets its adapters first (vlmft/lora.py, on the meta device
too), so the table lists them where they train: a ``lora`` column marks each row (``adapter``,
``saved`` for the trained copies of lora.modules_to_save, ``base`` for the frozen layers
under them; ``adapters`` counts them per layer with ``--by layer``), and the caption gives the
adapter and trainable counts. A bad lora glob is the same one-line error as in training.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

from .optim import ParamRow, plan
from .recipe import Recipe
from .schedule import lr_factor

VIEWS = ("param", "layer", "group")


def lr_table(recipe: Recipe, step: int = 1, by: str = "param") -> dict:
    """The table for a recipe's model (built on the meta device from its config)."""
    from .lora import apply
    from .model import meta_model

    return table_for_model(apply(meta_model(recipe.model), recipe.lora), recipe, step=step, by=by)


def table_for_model(model, recipe: Recipe, step: int = 1, by: str = "param") -> dict:
    """The same table for a model already built (any device; weights are not read)."""
    if by not in VIEWS:
        raise ValueError(f"by: {by!r} is not one of {', '.join(VIEWS)}")
    if step < 1:
        raise ValueError(f"--step: steps count from 1 (the first optimizer step), got {step}")
    if recipe.train.max_steps < 1:
        raise ValueError("train.epochs: the run's length in steps comes from the data, which "
                         "lr-table does not read; add train.epochs=0 train.max_steps=N "
                         "(vlmft train prints N at start-up)")
    rows, groups = plan(model, recipe.optim)
    factor = lr_factor(step - 1, recipe.schedule, recipe.train.max_steps)
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
              "tensors": len(rows), "groups": len(groups),
              "adapters": sum(r.numel for r in rows if r.lora == "adapter"),
              "saved": sum(r.numel for r in rows if r.lora == "saved")}
    if by == "param":
        out = params
    elif by == "layer":
        out = _by_layer(params)
    else:
        out = _by_group(params, group_rows)
    lora = None
    if any(r.lora for r in rows):
        lo = recipe.lora
        lora = {"r": lo.r, "alpha": lo.alpha, "layers": len({r.name.split(".lora_")[0] for r in rows
                                                            if r.lora == "adapter"}),
                "modules_to_save": list(lo.modules_to_save)}
    return {"model": recipe.model.name_or_path, "step": step, "lr_factor": factor, "by": by,
            "rows": out, "groups": group_rows, "totals": totals, "lora": lora}


def _param_row(r: ParamRow, base: float) -> dict:
    return {"name": r.name, "module": r.module, "shape": list(r.shape), "numel": r.numel,
            "tower": r.tower, "layer_id": r.layer_id, "lr_scale": r.lr_scale,
            "lr": 0.0 if r.frozen else base * r.lr_scale, "weight_decay": r.weight_decay,
            "frozen": r.frozen, "group": r.group, "reason": r.reason, "lora": r.lora}


def _aggregate(name: str, members: list[dict], **extra) -> dict:
    live = [p for p in members if not p["frozen"]]
    return {"name": name, "module": ", ".join(sorted({p["module"] for p in members})),
            "shape": None, "numel": sum(p["numel"] for p in members), "tensors": len(members),
            **extra,
            "lr": max((p["lr"] for p in live), default=0.0),
            "lr_min": min((p["lr"] for p in live), default=0.0),
            "weight_decay": max((p["weight_decay"] for p in live), default=0.0),
            "frozen": not live, "frozen_numel": sum(p["numel"] for p in members if p["frozen"]),
            "adapters": sum(p["numel"] for p in members if p.get("lora") == "adapter"),
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


# the columns of each view: all of them with --wide, else the ones that fit 80 columns
WIDE = {"param": ["name", "module", "shape", "tower", "layer_id", "lr", "weight_decay", "group",
                  "reason"],
        "layer": ["name", "tower", "layer_id", "numel", "lr", "lr_min", "weight_decay", "frozen",
                  "group"],
        "group": ["name", "layers", "tensors", "numel", "lr", "weight_decay"]}
NARROW = {"param": ["name", "layer", "lr", "weight_decay", "group"],
          "layer": ["name", "numel", "lr", "lr_min", "weight_decay", "frozen"],
          "group": ["name", "layers", "lr", "weight_decay"]}
LORA_COLUMN = {"param": "lora", "layer": "adapters"}  # added before the last column under LoRA
HEADS = {"weight_decay": "wd", "layer_id": "layer id", "lr_min": "lr min"}
NAME_MIN = 16


def render(table: dict, width: int = 80, wide: bool = False):
    """A rich Table of the rows with the totals as caption (the CLI prints it).

    Narrow (the default): the columns of ``NARROW``, parameter names abbreviated from the left
    (``…layers.0.mlp.up_proj.weight``) so that each row fits ``width``; LRs in short scientific
    form (``3e-3``, ``2.45e-5``), never cut. ``wide``: every column, nothing abbreviated (print
    it on a console as wide as :func:`wide_width` says)."""
    from rich import box
    from rich.table import Table

    by = table["by"]
    cols = (WIDE if wide else NARROW)[by]
    if table.get("lora") and by in LORA_COLUMN:  # adapter rows marked
        cols = cols[:-1] + [LORA_COLUMN[by]] + cols[-1:]
    cells = [[_fmt(c, r) for c in cols] for r in table["rows"]]
    heads = [HEADS.get(c, c) for c in cols]
    need = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    if not wide:  # the name column takes what the others leave (2 of padding, 1 rule each)
        room = max(NAME_MIN, width - sum(n + 3 for n in need[1:]) - 1)
        cells = [[_abbreviate(row[0], room)] + row[1:] for row in cells]
    t = table["totals"]
    caption = (f"step {table['step']} (lr x{table['lr_factor']:.4g}); trainable {t['trainable']:,} "
               f"(decayed {t['decayed']:,}, not decayed {t['non_decayed']:,}); frozen "
               f"{t['frozen']:,}; {t['groups']} optimizer groups")
    if table.get("lora"):
        lo = table["lora"]
        caption += (f"\nLoRA r={lo['r']} alpha={lo['alpha']:g}: adapters {t['adapters']:,} in "
                    f"{lo['layers']} layers; lora.modules_to_save {t['saved']:,}")
    out = Table(title=f"lr-table: {table['model']}", caption=caption, box=box.SIMPLE_HEAD,
                show_edge=False, pad_edge=False, padding=(0, 1))
    for i, (c, h) in enumerate(zip(cols, heads)):
        out.add_column(h, justify="right" if c in ("numel", "lr", "lr_min", "tensors", "adapters") else "left",
                       no_wrap=c != "layers", overflow="fold" if c == "layers" else "ellipsis",
                       min_width=None if i == 0 or c == "layers" else need[i])
    for row in cells:
        out.add_row(*row)
    return out


def wide_width(renderable) -> int:
    """The console width at which ``renderable`` prints with no cell cut."""
    from rich.console import Console

    return Console(width=10**5).measure(renderable).maximum


def _abbreviate(name: str, room: int) -> str:
    """``name`` cut from the left to ``room`` characters at a dot where one is near."""
    if len(name) <= room:
        return name
    tail = name[len(name) - room + 1:]
    dot = tail.find(".")
    if 0 <= dot < room // 3:
        tail = tail[dot + 1:]
    return "…" + tail


def sci(v: float) -> str:
    """A learning rate in short scientific form: 3e-3, 2.45e-5, 0."""
    if v == 0:
        return "0"
    mantissa, exp = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def _fmt(col: str, r: dict) -> str:
    if col == "layer":
        lid = r.get("layer_id")
        return f"{r['tower']}[{lid}]" if lid is not None else str(r["tower"])
    v = r.get(col)
    if col == "group" and v is None and r.get("frozen"):
        return "frozen"
    if v is None:
        return "-"
    if col in ("lr", "lr_min"):
        return sci(v)
    if col in ("numel", "adapters"):
        return f"{v:,}"
    if col == "lora":
        return "" if v == "other" else v
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if col == "shape" else ",".join(map(str, v))
    return str(v)
