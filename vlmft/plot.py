"""``vlmft plot runs/NAME``: a run's curves in one PNG, from its metrics.jsonl.

Top: the training loss (all data, and ``train/<name>/loss`` per training dataset) with the
held-out ``eval/<name>/loss`` points per eval set (and ``loss_blank_images`` dashed, when
measured). Bottom: the learning rate. Needs matplotlib (``pip install 'vlmft[plot]'``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SIZE = (12.0, 8.0)   # inches
DPI = 100            # so the PNG is 1200 x 800 pixels


def series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] for every number of the rows (None and non-numbers left out)."""
    out: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def read(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl; give a run's output_dir (e.g. runs/demo)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    return rows


def plot(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default {run}/curves.png) and return its path."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("vlmft plot needs matplotlib: pip install 'vlmft[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(read(Path(run)))
    out = Path(out) if out else Path(run) / "curves.png"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=SIZE, dpi=DPI, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    _line(top, s, "loss", "train (all)", color="black", lw=1.5)
    for k in sorted(k for k in s if re.fullmatch(r"train/.+/loss", k)):
        _line(top, s, k, f"train {k[6:-5]}", lw=1.0, alpha=0.8)
    for k in sorted(k for k in s if re.fullmatch(r"eval/.+/loss", k)):
        name = k[5:-5]
        line = _line(top, s, k, f"eval {name}", marker="o", lw=1.5)
        blank = f"eval/{name}/loss_blank_images"
        if blank in s:
            _line(top, s, blank, f"eval {name}, blank images", marker="x", ls="--",
                  color=line.get_color(), lw=1.0)
    top.set_ylabel("loss")
    top.set_title(f"{Path(run).resolve().name}: loss per dataset")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    _line(bottom, s, "lr", "lr", color="tab:gray")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("learning rate")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _line(ax, s: dict, key: str, label: str, **kw):
    pts = s.get(key, [])
    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **kw)
    return line
