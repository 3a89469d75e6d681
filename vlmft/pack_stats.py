"""``vlmft pack-stats``: how well a recipe's data packs, before any GPU time is spent.

Every record is planned exactly as training plans it (:func:`vlmft.data.catalog.build_catalog`:
chat template, tokens, image tokens and tiles from file headers, no pixel decoded); the usable
samples, once each, in a random order seeded by ``train.seed`` (training shuffles too; its
mixture and rounds are not replayed here), are packed with the recipe's strategy and limits.
The same samples, in the same order, are also packed with the other strategies (``best_fit``,
``internvl``, ``next_fit``), and with best-fit-decreasing over the whole stream at once
(``offline_bfd``, the practical optimum); ``lower_bound_packs`` is ceil(total tokens /
max_packed_tokens). ``samples_per_second`` is the planning throughput (records read per
second of ``build_catalog``).

Per-rank compute: the first round of the training plan (vlmft/data/stream.py ``PackPlan``:
mixture, shuffle, step balance or compute grouping, as ``vlmft train`` plans it) cut into
steps of world_size x micro_batch_size x grad_accum_steps packs; per step, the most loaded
rank's modelled compute over the mean rank's, under the recipe's deal and round-robin
(``rank_balance``); for the recipe's deal the worst step (``rank_compute_max_over_mean``) and
the mean over steps (``rank_compute_mean_max_over_mean``).

Bad samples never stop pack-stats (``data.on_bad_sample`` is taken as ``skip``): each is
counted under its reason with the first few ``file:line: detail``.

The returned dict is what ``--json`` prints; :func:`render` draws it with rich.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import numpy as np

from .recipe import Recipe

HIST_BINS = 16
PROGRESS_MIN_RECORDS = 2000   # smaller inputs plan in well under a second: no bar
COMPARED = ("best_fit", "internvl", "next_fit")


def pack_stats(recipe: Recipe, limit: int = 0, progress: bool = False, workers: int | None = None,
               world_size: int = 8) -> dict:
    """Plan and pack the recipe's data; return the statistics as plain JSON-able data."""
    from .data.catalog import build_catalog
    from .model import load_processor

    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, on_bad_sample="skip"))
    cfg = recipe.data.packing
    cap, max_tiles = cfg.max_packed_tokens, cfg.num_images_expected
    processor = load_processor(recipe.model)
    t0 = time.perf_counter()
    with _Progress(progress) as bar:
        cat = build_catalog(recipe, processor, limit=limit, on_step=bar.step, workers=workers)
    plan_s = time.perf_counter() - t0

    order = np.random.default_rng(recipe.train.seed).permutation(len(cat.samples)).tolist()
    lengths = np.array([cat.samples[i].length for i in order], dtype=np.int64)
    tiles = np.array([cat.samples[i].tiles for i in order], dtype=np.int64)
    total = int(lengths.sum())
    strategies, main = _compare_strategies(recipe.data, lengths, tiles, total)
    main_strategy = cfg.strategy if cfg.enabled else "none (packing.enabled=false)"

    n = len(cat.records)
    ranks = _rank_balance(recipe, cat, world_size)
    return {
        "recipe_strategy": main_strategy,
        "max_packed_tokens": cap,
        "max_tiles_per_pack": max_tiles,
        **_sample_counts(cat),
        "total_tokens": total,
        "total_tiles": int(tiles.sum()),
        "supervised_tokens": sum(s.n_supervised for s in cat.samples),
        "num_packs": len(main),
        "lower_bound_packs": -(-total // cap),
        "fill_ratio": total / (len(main) * cap) if main else 0.0,
        "padding_tokens": len(main) * cap - total,
        "samples_per_pack": _dist([len(p) for p in main]),
        "tiles_per_pack": _dist([int(tiles[p].sum()) for p in main]),
        "length_histogram": _histogram(lengths, cap),
        "per_dataset": _per_dataset(cat),
        "strategies": strategies,
        "rank_balance": ranks,
        "rank_compute_max_over_mean": ranks.get("max_over_mean_worst", 1.0),
        "rank_compute_mean_max_over_mean": ranks.get("max_over_mean_mean", 1.0),
        "plan_seconds": round(plan_s, 3),
        "samples_per_second": n / plan_s if plan_s > 0 else 0.0,
    }


def _sample_counts(cat) -> dict:
    """Samples read, used and dropped (by reason, with examples), and truncated."""
    return {
        "num_samples": len(cat.records),
        "num_used": len(cat.samples),
        "num_dropped": sum(cat.dropped.values()),
        "dropped": dict(sorted(cat.dropped.items())),
        "dropped_examples": {k: list(v) for k, v in sorted(cat.examples.items())},
        "truncated": cat.truncated,
        "truncated_examples": list(cat.truncated_examples),
    }


def _compare_strategies(data, lengths: np.ndarray, tiles: np.ndarray,
                        total: int) -> tuple[dict, list[list[int]]]:
    """The same samples packed with each of COMPARED and with ``offline_bfd``: (summary by
    strategy, the recipe's packs; one sample a row with packing disabled)."""
    from .data.stream import packer_args

    cfg = data.packing
    cap = cfg.max_packed_tokens
    limits, knobs = packer_args(data)
    strategies = {}
    for name in COMPARED:
        packs, secs = _pack(lengths, tiles, limits, name, **knobs)
        strategies[name] = _summary(packs, secs, total, cap)
        if name == cfg.strategy:
            main = packs
    packs, secs = _pack(lengths, tiles, limits, "best_fit", window=max(len(lengths), 1))
    strategies["offline_bfd"] = _summary(packs, secs, total, cap)
    if not cfg.enabled:                       # one sample a row
        main = [[i] for i in range(len(lengths))]
    return strategies, main


def _pack(lengths: np.ndarray, tiles: np.ndarray, limits, strategy: str,
          **kw) -> tuple[list[list[int]], float]:
    """The packs of ``strategy`` and the seconds packing took."""
    from .data import packing

    if not len(lengths):
        return [], 0.0
    if strategy != "best_fit":
        kw = {k: v for k, v in kw.items() if k != "compute"}
    t = time.perf_counter()
    packs = list(packing.pack(lengths, tiles, limits, strategy=strategy, **kw))
    return packs, time.perf_counter() - t


def _rank_balance(recipe: Recipe, cat, world: int) -> dict:
    """Per-rank modelled compute of the steps of the first round, as training plans and deals
    them (vlmft/data/stream.py PackPlan: mixture, shuffle, step balance or cost grouping), for
    the recipe's deal and round-robin; ``max_over_mean_*`` = the recipe's deal."""
    from .data import balance
    from .data.stream import PackPlan

    t = recipe.train
    per_rank = t.global_batch(1)
    if not cat.samples:
        return {"world": world, "per_rank": per_rank, "steps": 0}
    costs = PackPlan(recipe, cat, global_batch=world * per_rank).round(0).costs
    rep = balance.balance_report(costs, world, per_rank, t.micro_batch_size)
    deal = rep["balanced" if recipe.data.rank_balance == "compute" else "round_robin"]
    rep["max_over_mean_worst"], rep["max_over_mean_mean"] = deal["worst"], deal["max_over_mean"]
    rep["steps_off_median"] = balance.grouped_share(costs, world * per_rank)
    return rep


def _summary(packs: list[list[int]], secs: float, total: int, cap: int) -> dict:
    return {"num_packs": len(packs), "fill_ratio": total / (len(packs) * cap) if packs else 0.0,
            "padding_tokens": len(packs) * cap - total, "seconds": round(secs, 4)}


def _dist(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": int(np.percentile(a, 50, method="lower")),
            "p90": int(np.percentile(a, 90, method="lower")), "max": int(a.max())}


def _histogram(lengths: np.ndarray, cap: int) -> list[dict]:
    """HIST_BINS equal bins over (0, cap]: bin k holds lengths in [lo, hi]."""
    width = max(1, math.ceil(cap / HIST_BINS))
    edges = list(range(0, cap, width)) + [cap]
    counts = np.histogram(lengths, bins=np.array(edges) + 0.5)[0] if len(lengths) else [0] * (len(edges) - 1)
    return [{"lo": lo + 1, "hi": hi, "count": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)]


def _per_dataset(cat) -> dict:
    read = Counter(r.dataset for r in cat.records)
    used, tokens, tiles = Counter(), Counter(), Counter()
    for s in cat.samples:
        used[s.dataset] += 1
        tokens[s.dataset] += s.length
        tiles[s.dataset] += s.tiles
    out = {}
    for i, ds in enumerate(cat.datasets):
        name = ds.name if ds.name not in out else f"{ds.name}#{i}"
        out[name] = {"annotation": str(ds.annotation), "repeat_time": ds.repeat_time,
                     "num_samples": read[i], "num_used": used[i],
                     "dropped": dict(sorted(cat.dropped_by_dataset.get(i, {}).items())),
                     "tokens": tokens[i], "tiles": tiles[i],
                     "mean_length": tokens[i] / used[i] if used[i] else 0.0}
    return out


class _Progress:
    """A rich progress bar on stderr for long inputs; ``step(done, total)`` is build_catalog's
    on_step. Does nothing when disabled or the input is short."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self):
        return self

    def step(self, done: int, total: int) -> None:
        if not self.enabled or total < PROGRESS_MIN_RECORDS:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("planning samples"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("plan", total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- rendering

def render(stats: dict):
    """A rich Group: summary, strategies side by side, drops, datasets, length histogram."""
    from rich.console import Group

    parts = [_summary_table(stats), _strategies_table(stats)]
    if stats["rank_balance"]["steps"]:
        parts.append(_balance_table(stats["rank_balance"]))
    if stats["dropped"] or stats["truncated"]:
        parts.append(_drops_table(stats))
    parts.append(_datasets_table(stats["per_dataset"]))
    parts.append(histogram(stats["length_histogram"]))
    return Group(*parts)


def _over_lower_bound(s: dict) -> str:
    lb = s["lower_bound_packs"]
    return f"+{s['num_packs'] - lb} ({(s['num_packs'] / lb - 1) * 100:.2f}%)" if lb else "-"


def _summary_table(s: dict):
    from rich.table import Table

    cap, lb = s["max_packed_tokens"], s["lower_bound_packs"]
    summary = Table(title="pack-stats", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("samples read", f"{s['num_samples']:,}"),
        ("used", f"{s['num_used']:,}" + (f" ({s['truncated']:,} truncated)" if s["truncated"] else "")),
        ("dropped", f"{s['num_dropped']:,}"),
        ("tokens (supervised)", f"{s['total_tokens']:,} ({s['supervised_tokens']:,})"),
        ("image tiles", f"{s['total_tiles']:,}"),
        ("strategy", f"{s['recipe_strategy']}, {cap} tokens/pack"
                     + (f", <= {s['max_tiles_per_pack']} tiles" if s["max_tiles_per_pack"] else "")),
        ("packs (lower bound)", f"{s['num_packs']:,} ({lb:,}, {_over_lower_bound(s)})"),
        ("fill ratio", f"{s['fill_ratio'] * 100:.3f}%"),
        ("padding tokens", f"{s['padding_tokens']:,}"),
        ("samples per pack", _fmt_dist(s["samples_per_pack"])),
        ("tiles per pack", _fmt_dist(s["tiles_per_pack"])),
        ("planning", f"{s['samples_per_second']:,.0f} samples/s ({s['plan_seconds']:.2f} s)"),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    return summary


def _strategies_table(s: dict):
    from rich.table import Table

    lb = s["lower_bound_packs"]
    strat = Table(title="strategies on the same samples", title_justify="left")
    for c in ("strategy", "packs", "vs lower bound", "fill", "padding tokens"):
        strat.add_column(c, justify="left" if c == "strategy" else "right")
    for name, v in s["strategies"].items():
        mark = " (recipe)" if name == s["recipe_strategy"] else ""
        strat.add_row(name + mark, f"{v['num_packs']:,}", f"+{v['num_packs'] - lb:,}",
                      f"{v['fill_ratio'] * 100:.3f}%", f"{v['padding_tokens']:,}")
    return strat


def _balance_table(rb: dict):
    from rich.table import Table

    bal = Table(title=f"per-rank compute per step, first round as training plans it: "
                      f"{rb['world']} ranks x {rb['per_rank']} packs ({rb['steps']} steps; "
                      f"slowest rank / mean rank, 1.0 = even)", title_justify="left",
                caption=f"steps holding a pack off the median cost by >1%: "
                        f"{rb['steps_off_median'] * 100:.1f}%")
    for c in ("deal", "mean over steps", "p99", "worst step"):
        bal.add_column(c, justify="left" if c == "deal" else "right")
    for name in ("balanced", "round_robin"):
        v = rb[name]
        bal.add_row(name, f"{v['max_over_mean']:.4f}", f"{v['p99']:.4f}", f"{v['worst']:.4f}")
    return bal


def _drops_table(s: dict):
    from rich.table import Table

    drops = Table(title="dropped samples", title_justify="left")
    drops.add_column("reason")
    drops.add_column("count", justify="right")
    drops.add_column("first examples (file:line: detail)", overflow="fold")
    for reason, count in s["dropped"].items():
        drops.add_row(reason, f"{count:,}", "\n".join(s["dropped_examples"].get(reason, [])))
    if s["truncated"]:
        drops.add_row("truncated (kept)", f"{s['truncated']:,}", "\n".join(s["truncated_examples"]))
    return drops


def _datasets_table(per_dataset: dict):
    from rich.table import Table

    per = Table(title="datasets", title_justify="left")
    for c in ("dataset", "repeat", "read", "used", "dropped", "tokens", "mean length", "tiles"):
        per.add_column(c, justify="left" if c == "dataset" else "right")
    for name, d in per_dataset.items():
        per.add_row(name, f"{d['repeat_time']:g}", f"{d['num_samples']:,}", f"{d['num_used']:,}",
                    f"{sum(d['dropped'].values()):,}", f"{d['tokens']:,}", f"{d['mean_length']:.1f}",
                    f"{d['tiles']:,}")
    return per


def histogram(bins: list[dict], width: int = 40):
    """The sample-length histogram as a table of bars."""
    from rich.table import Table

    t = Table(title="sample lengths (tokens)", title_justify="left", show_edge=False, box=None)
    t.add_column("length", justify="right")
    t.add_column("samples", justify="left")
    t.add_column("count", justify="right")
    top = max((b["count"] for b in bins), default=0) or 1
    eighths = " ▏▎▍▌▋▊▉"
    used = [k for k, b in enumerate(bins) if b["count"]]
    if used and (used[0] > 0 or used[-1] < len(bins) - 1):   # empty bins at the ends: a note
        t.caption = "no sample " + " or ".join(
            f"in {bins[a]['lo']}-{bins[b]['hi']}" for a, b in ((0, used[0] - 1), (used[-1] + 1, len(bins) - 1))
            if a <= b)
        bins = bins[used[0]:used[-1] + 1]
    for b in bins:
        units = b["count"] / top * width * 8
        full, part = divmod(round(units), 8)
        bar = "█" * full + (eighths[part] if part else "")
        if b["count"] and not bar:
            bar = "▏"
        t.add_row(f"{b['lo']}-{b['hi']}", f"[cyan]{bar}[/cyan]", f"{b['count']:,}")
    return t


def _fmt_dist(d: dict) -> str:
    return f"mean {d['mean']:.2f}, p50 {d['p50']}, p90 {d['p90']}, max {d['max']}"
