"""What planning dropped, per dataset, and whether that is more than the recipe allows.

``vlmft train`` prints :func:`table_lines` before the first step and stops with
:func:`budget_errors` when a dataset lost more than ``data.max_bad_fraction`` of its own samples,
or all of them, or holds none (a wrong ``image_root`` drops every sample of its dataset as
missing_image: that run stops here, before any training, with one line naming the dataset).
Samples count as read with repeat_time applied (a record read twice counts twice); every drop
reason counts, too_long and too_many_tiles included (they are reported with the limit that
would have kept them). The same budget goes on during training, where samples that fail to
materialize join the planning drops (vlmft/data/loader.py :func:`bad_fraction_error`).
"""

from __future__ import annotations

from collections import Counter

from .catalog import REASONS, Catalog

NEEDS = {"too_long": "data.packing.max_packed_tokens", "too_many_tiles": "data.packing.num_images_expected"}


def per_dataset(cat: Catalog) -> list[dict]:
    """One row per dataset: name, annotation, read, used, dropped, and by reason its count,
    first examples (``file:line: detail``) and, for limits, the value that keeps them all."""
    read = Counter(r.dataset for r in cat.records)
    used = Counter(s.dataset for s in cat.samples)
    rows = []
    for i, ds in enumerate(cat.datasets):
        reasons = {}
        for reason, n in sorted(cat.dropped_by_dataset.get(i, {}).items(), key=lambda kv: -kv[1]):
            reasons[reason] = {"count": n, "examples": list(cat.examples_by_dataset[i][reason]),
                               "need": cat.needs.get((i, reason), 0)}
        rows.append({"name": ds.name, "annotation": str(ds.annotation), "read": read[i],
                     "used": used[i], "dropped": read[i] - used[i], "reasons": reasons})
    return rows


def _need(reason: str, value: int) -> str:
    return f"needs {NEEDS[reason]} >= {value}" if value and reason in NEEDS else ""


def table_lines(cat: Catalog) -> list[str]:
    """The drop table as text lines (empty when nothing was dropped or truncated)."""
    rows = per_dataset(cat)
    dropped = sum(r["dropped"] for r in rows)
    if not dropped and not cat.truncated:
        return []
    out = [f"vlmft: {dropped} of {sum(r['read'] for r in rows)} samples dropped while planning "
           "(reason, count, first examples):"]
    for r in rows:
        out.append(f"  {r['name']} ({r['annotation']}): {r['dropped']} of {r['read']} dropped")
        for reason, v in r["reasons"].items():
            need = _need(reason, v["need"])
            out.append(f"    {reason}: {v['count']}" + (f" ({need})" if need else ""))
            out += [f"      {ex}" for ex in v["examples"]]
    if cat.truncated:
        out.append(f"  truncated to max_packed_tokens (kept): {cat.truncated}")
        out += [f"      {ex}" for ex in cat.truncated_examples]
    return out


def budget_errors(cat: Catalog, max_fraction: float) -> list[str]:
    """One line per dataset that lost more than ``max_fraction`` of its samples, all of them,
    or has none; empty when every dataset is within the budget."""
    out = []
    for r in per_dataset(cat):
        head = f"dataset '{r['name']}' ({r['annotation']})"
        if r["read"] == 0:
            out.append(f"{head}: no records; fix the file or remove the dataset from data.datasets")
            continue
        if r["dropped"] == 0 or (r["used"] and r["dropped"] <= max_fraction * r["read"]):
            continue
        reason, v = next(iter(r["reasons"].items()))
        what = (f"all {r['read']} samples dropped" if not r["used"] else
                f"{r['dropped']} of {r['read']} samples dropped ({100 * r['dropped'] / r['read']:.1f}%, "
                f"more than data.max_bad_fraction={max_fraction:g})")
        others = ", ".join(f"{k} {x['count']}" for k, x in r["reasons"].items())
        example = v["examples"][0] if v["examples"] else ""
        need = _need(reason, v["need"])
        fix = REASONS.get(reason, "fix or remove those records") + (f" (keeping them all {need})" if need else "")
        tail = "; or raise data.max_bad_fraction" if r["used"] else ""
        out.append(f"{head}: {what} ({others}; e.g. {example}); {fix}{tail}")
    return out
