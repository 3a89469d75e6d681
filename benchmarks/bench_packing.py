"""Packing quality and planning speed on three synthetic length streams (lengths alone).

    .venv/bin/python benchmarks/bench_packing.py            # markdown tables
    .venv/bin/python benchmarks/bench_packing.py --json     # one JSON object
    .venv/bin/python benchmarks/bench_packing.py --check    # exit 1 if best_fit misses its targets

Streams: 50,000 samples, 8192-token rows, numpy default_rng(0) per stream.
  lognormal   lognormal, median 600, sigma 0.8, clipped to [16, 8192]
  bimodal     60% short: uniform 40..200 text tokens + one 256-token image (1 tile);
              40% long: lognormal median 1800, sigma 0.6, clipped to [1, 8192]
  heavy-tail  numpy pareto a=1.2 scaled so the median is 300, clipped to [8, 8192]
fill = tokens / (packs x 8192); "+LB" = packs above ceil(tokens / 8192); samples/s = samples /
best wall time of --repeat runs of planning alone (list(pack(...)) on a numpy array).
A second table counts the bimodal stream's tiles with at most 8 tiles a pack; its reference
is best_fit with the whole stream as one window (offline; not an optimum with two limits).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmft.data.packing import Limits, lower_bound, offline_bfd, pack  # noqa: E402

N, CAP = 50_000, 8192
TARGET_PP, TARGET_RATE = 0.1, 1_000_000


def lognormal(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(math.log(600), 0.8, n)
    return np.clip(np.rint(x), 16, CAP).astype(np.int64), None


def bimodal(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    short = rng.random(n) < 0.6
    text = rng.integers(40, 201, n)
    long = np.clip(np.rint(rng.lognormal(math.log(1800), 0.6, n)), 1, CAP)
    return np.where(short, text + 256, long).astype(np.int64), short.astype(np.int64)


def heavy_tail(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.pareto(1.2, n) * 300 / (2 ** (1 / 1.2) - 1)   # numpy's pareto has median 2^(1/a)-1
    return np.clip(np.rint(x), 8, CAP).astype(np.int64), None


STREAMS = {"lognormal": lognormal, "bimodal": bimodal, "heavy-tail": heavy_tail}


def check(packs, lengths, tiles, limits):
    flat = np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in packs]))
    assert np.array_equal(flat, np.arange(len(lengths))), "a sample is missing or repeated"
    assert all(int(lengths[p].sum()) <= limits.max_tokens for p in packs), "token limit broken"
    if limits.max_tiles and tiles is not None:
        assert all(int(tiles[p].sum()) <= limits.max_tiles for p in packs), "tile limit broken"


def measure(name, run, lengths, tiles, limits, lb, repeat):
    best, packs = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        packs = run()
        best = min(best, time.perf_counter() - t0)
    check(packs, lengths, tiles, limits)
    tokens = int(lengths.sum())
    return {"packer": name, "packs": len(packs), "above_lower_bound": len(packs) - lb,
            "fill_pct": 100 * tokens / (len(packs) * limits.max_tokens),
            "samples_per_s": len(lengths) / best, "seconds": best}


def bench_stream(stream, lengths, tiles, limits, repeat):
    n = len(lengths)
    lb = lower_bound(lengths.tolist(), limits.max_tokens)
    if limits.max_tiles and tiles is not None:
        lb = max(lb, -(-int(tiles.sum()) // limits.max_tiles))
        tl = tiles
        ref = ("best_fit, whole stream as one window", lambda: list(pack(lengths, tl, limits, window=n)))
    else:
        tl = None
        ref = ("offline BFD", lambda: offline_bfd(lengths, limits.max_tokens))
    runs = [ref,
            ("best_fit (4096 window, 64 open)",
             lambda: list(pack(lengths, tl, limits, strategy="best_fit", window=4096, max_open=64))),
            ("next_fit", lambda: list(pack(lengths, tl, limits, strategy="next_fit"))),
            ("internvl (20 buffers)",
             lambda: list(pack(lengths, tl, limits, strategy="internvl", max_open=20)))]
    rows = [dict(stream=stream, lower_bound=lb, **measure(name, run, lengths, tl, limits, lb, repeat))
            for name, run in runs]
    for r in rows:
        r["vs_offline_pp"] = r["fill_pct"] - rows[0]["fill_pct"]
    return rows


def table(rows) -> str:
    out = ["| stream | packer | packs (+LB) | fill | vs offline | samples/s |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stream']} | {r['packer']} | {r['packs']} (+{r['above_lower_bound']}) | "
                   f"{r['fill_pct']:.3f}% | {r['vs_offline_pp']:+.3f} pp | "
                   f"{r['samples_per_s'] / 1e6:.2f} M |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per packer (best is kept)")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 unless best_fit is within {TARGET_PP} pp of offline and "
                         f">= {TARGET_RATE:,} samples/s on every stream")
    a = ap.parse_args(argv)
    main_rows, tile_rows = [], []
    for stream, make in STREAMS.items():
        lengths, _ = make()
        main_rows += bench_stream(stream, lengths, None, Limits(CAP), a.repeat)
    lengths, tiles = bimodal()
    tile_rows = bench_stream("bimodal, <= 8 tiles", lengths, tiles, Limits(CAP, 8), a.repeat)
    ours = [r for r in main_rows if r["packer"].startswith("best_fit")]
    ok = all(r["vs_offline_pp"] >= -TARGET_PP and r["samples_per_s"] >= TARGET_RATE for r in ours)
    verdict = (f"best_fit within {TARGET_PP} pp of offline and >= {TARGET_RATE / 1e6:.0f}M samples/s "
               f"on all three streams: {'yes' if ok else 'NO'}")
    if a.json:
        print(json.dumps({"samples": N, "capacity": CAP, "rows": main_rows, "tile_rows": tile_rows,
                          "targets_met": ok}, indent=1))
    else:
        print(f"{N:,} samples per stream, {CAP}-token rows, lengths alone\n")
        print(table(main_rows))
        print("\nbimodal stream with its tiles counted (1 per short sample), at most 8 tiles a pack\n")
        print(table(tile_rows))
        print("\n" + verdict)
    return 0 if ok or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
