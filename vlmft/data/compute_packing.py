"""best_fit that balances compute: packs of near-equal modelled cost (``data.packing.balance_compute``).

A sample's cost (vlmft/data/balance.py) is c = L + L^2 / L* + tile_cost x tiles, in token
units, and a pack's cost is the sum over its samples. Token-only best fit fills every row to
~max_tokens, but the rows' costs still differ by 10-20% (one long sample's attention, a row of
image samples' tiles): with one pack a rank, the slowest rank sets the step's time. Here every
batch of ``window`` samples (with the packs carried open from the batch before) is packed as:

1. Reference density. ``d`` = the 10% token-weighted quantile of the samples' extra density
   (c - L) / L: the cheapest fillers. A pack with ``room`` tokens left whose room were filled
   with such samples would end at its *projection* P = cost + room x (1 + d); a sample moves
   the projection of the pack it joins by its *steer* a = c - L x (1 + d).
2. K = ceil(tokens / max_tokens) packs are opened (the carried packs count among them).
3. A sample longer than half a row takes an empty pack (no two of them can share one).
4. Steering samples (|a| >= 0.002 x max_tokens, or |a| >= 0.05 x L), largest |a| first, join
   the pack with the lowest projection (a > 0) or the highest (a < 0) among those with room for
   their tokens and tiles: longest-processing-time-first on the projections, so each pack's
   projection ends near the batch's mean.
5. The other samples (fillers), longest first, go by best fit on token room.
6. Repair. A filler left over is swapped in for a shorter member of a pack whose room it then
   fills better (the member becomes the left-over); a few passes, while any swap is found.
7. What is still left over goes by best fit to new packs.

Guard: the same batch is also packed token-only (best-fit-decreasing from the same open packs).
The balanced packing is kept while, summed over the batches so far, it uses at most
``SLACK`` (0.05%) more packs than the token-only one; otherwise the token-only packs are used
for that batch. So fill stays within about 0.05 percentage points of best fit at the same
window. On the three streams of benchmarks/bench_balance.py (L* = 49152) the balanced packing
was kept in 37 of 39 batches (bimodal: 11 of 13) and filled as well or better: the repair step
recovers room that greedy placement wastes; with L* = 8192 the bimodal stream kept it in 1 of 13.

Closing is best_fit's: a full pack is emitted at once; at the end of a batch the fullest close
until ``max_open`` remain open; the end of the stream emits the rest. A pack whose cost cannot
come near the others' (one sample of a full row) stays as it is: balance.group_steps puts such
packs in steps together.

About 50-100k samples/s (numpy, one placement at a time), against >1M for token-only best fit.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .balance import sample_costs

STEER_TOKENS = 0.002   # |a| >= this x max_tokens: the sample steers projections
STEER_DENSITY = 0.05   # or |a| >= this x its length
FILLER_QUANTILE = 0.1  # d = this token-weighted quantile of the extra density
SLACK = 0.0005         # extra packs allowed against token-only best fit, cumulative
REPAIR_PASSES = 3


class _Batch:
    """Packs being filled: members, and tokens, tiles and cost per pack (preallocated arrays)."""

    def __init__(self, carried: list[tuple[list[int], int, int, float]], capacity: int):
        n = len(carried) + 2 * capacity + 2   # K new packs, then at most one per sample
        self.members = [list(p[0]) for p in carried]
        self.tok, self.til, self.cost = np.zeros(n), np.zeros(n), np.zeros(n)
        for j, (_, tk, tl, c) in enumerate(carried):
            self.tok[j], self.til[j], self.cost[j] = tk, tl, c

    def open(self) -> int:
        self.members.append([])
        return len(self.members) - 1

    def add(self, j: int, i: int, L: int, t: int, c: float) -> None:
        self.members[j].append(i)
        self.tok[j] += L
        self.til[j] += t
        self.cost[j] += c

    def fits(self, cap: int, T: int, L: int, t: int) -> np.ndarray:
        n = len(self.members)
        ok = self.tok[:n] + L <= cap
        if T:
            ok &= self.til[:n] + t <= T
        return ok

    def best_fit(self, cap: int, T: int, L: int, t: int) -> int:
        """The pack with the least token room that holds the sample, or -1."""
        ok = self.fits(cap, T, L, t)
        if not len(ok):
            return -1
        j = int(np.where(ok, self.tok[:len(ok)], -1.0).argmax())
        return j if ok[j] else -1

    def packs(self) -> list[tuple[list[int], int, int, float]]:
        return [(m, int(self.tok[j]), int(self.til[j]), float(self.cost[j]))
                for j, m in enumerate(self.members) if m]


def best_fit_compute(chunks, cap: int, max_tiles: int, max_open: int, *, attention_length: float,
                     tile_cost: float) -> Iterator[list[int]]:
    """Packs as lists of sample indices; ``chunks`` as packing._chunks yields them."""
    carried: list[tuple[list[int], int, int, float]] = []
    known: dict[int, tuple[int, int, float]] = {}     # (length, tiles, cost) of carried members
    budget = 0.0
    for start, la, ta in chunks:
        t = np.zeros_like(la) if ta is None else ta
        c = sample_costs(la, t, attention_length=attention_length, tile_cost=tile_cost)
        items = (np.arange(start, start + len(la)), la, t, c)
        ref = _token_only(carried, items, cap, max_tiles)
        got = _balanced(carried, items, cap, max_tiles, known)
        budget += SLACK * float(la.sum()) / cap
        if len(got) - len(ref) <= budget:
            budget -= len(got) - len(ref)
        else:
            got = ref
        closed = [p for p in got if p[1] >= cap]
        rest = sorted((p for p in got if p[1] < cap), key=lambda p: (-p[1], p[0][0]))
        k = max(0, len(rest) - max_open)                  # the fullest go, the emptiest wait
        closed += rest[:k]
        carried = rest[k:]
        known = {i: known.get(i) or (int(la[i - start]), int(t[i - start]), float(c[i - start]))
                 for p in carried for i in p[0]}
        yield from _ordered([p[0] for p in closed])
    yield from _ordered([p[0] for p in carried])


def _ordered(packs: list[list[int]]) -> list[list[int]]:
    """Members sorted, packs in stream order of their first sample (as packing.pack emits)."""
    for p in packs:
        p.sort()
    packs.sort(key=lambda p: p[0])
    return packs


def _token_only(carried, items, cap: int, T: int):
    """Best-fit-decreasing of the batch from the same open packs: the guard's reference."""
    idx, la, ta, c = items
    if not T:
        return _token_only_fast(carried, items, cap)
    b = _Batch(carried, len(la))
    for k in np.argsort(-la, kind="stable").tolist():
        L, t = int(la[k]), int(ta[k])
        j = b.best_fit(cap, T, L, t)
        b.add(b.open() if j < 0 else j, int(idx[k]), L, t, float(c[k]))
    return b.packs()


def _token_only_fast(carried, items, cap: int):
    """_token_only without a tile limit, packs indexed by room as in packing._best_fit."""
    idx, la, ta, c = items
    packs = [[list(m), tk, tl, cs] for m, tk, tl, cs in carried]
    has_room = bytearray(cap + 1)
    by_room: dict[int, list[int]] = {}
    for j, p in enumerate(packs):
        by_room.setdefault(cap - p[1], []).append(j)
        has_room[cap - p[1]] = 1
    for k in np.argsort(-la, kind="stable").tolist():
        L = int(la[k])
        r = has_room.find(1, L)
        if r < 0:
            j, r = len(packs), cap
            packs.append([[], 0, 0, 0.0])
        else:
            j = by_room[r].pop()
            if not by_room[r]:
                has_room[r] = 0
        p = packs[j]
        p[0].append(int(idx[k]))
        p[1] += L
        p[2] += int(ta[k])
        p[3] += float(c[k])
        if r - L:
            by_room.setdefault(r - L, []).append(j)
            has_room[r - L] = 1
    return [tuple(p) for p in packs if p[0]]


def _sample(items, known: dict, i: int) -> tuple[int, int, float]:
    """(length, tiles, cost) of sample i: of this batch, or of a pack carried in."""
    idx, la, ta, c = items
    k = i - int(idx[0])
    return (int(la[k]), int(ta[k]), float(c[k])) if k >= 0 else known[i]


def _balanced(carried, items, cap: int, T: int, known: dict):
    idx, la, ta, c = items
    L = la.astype(np.float64)
    dens = (c - L) / L
    order = np.argsort(dens, kind="stable")
    cum = np.cumsum(L[order])
    d = float(dens[order][min(np.searchsorted(cum, FILLER_QUANTILE * cum[-1]), len(cum) - 1)])
    a = c - L * (1.0 + d)
    b = _Batch(carried, len(la))
    K = max(len(carried), math.ceil((float(L.sum()) + float(b.tok.sum())) / cap))
    while len(b.members) < K:
        b.open()
    long_ = la > cap // 2
    steer = ~long_ & ((np.abs(a) >= STEER_TOKENS * cap) | (np.abs(a) >= STEER_DENSITY * L))
    fill = ~long_ & ~steer
    empty = [j for j, m in enumerate(b.members) if not m]
    for k in np.flatnonzero(long_)[np.argsort(-la[long_], kind="stable")].tolist():
        j = empty.pop(0) if empty else -1
        if j < 0 or not b.fits(cap, T, int(la[k]), int(ta[k]))[j]:
            j = b.open()
        b.add(j, int(idx[k]), int(la[k]), int(ta[k]), float(c[k]))
    for k in np.flatnonzero(steer)[np.argsort(-np.abs(a[steer]), kind="stable")].tolist():
        _steer(b, cap, T, d, k, items, a[k])
    left = []
    for k in np.flatnonzero(fill)[np.argsort(-la[fill], kind="stable")].tolist():
        j = b.best_fit(cap, T, int(la[k]), int(ta[k]))
        if j < 0:
            left.append(k)
        else:
            b.add(j, int(idx[k]), int(la[k]), int(ta[k]), float(c[k]))
    for i in sorted(_repair(b, cap, T, left, items, known), key=lambda i: (-_sample(items, known, i)[0], i)):
        L_, t_, c_ = _sample(items, known, i)
        j = b.best_fit(cap, T, L_, t_)
        b.add(b.open() if j < 0 else j, i, L_, t_, c_)
    return b.packs()


def _steer(b: _Batch, cap: int, T: int, d: float, k: int, items, a: float) -> None:
    idx, la, ta, c = items
    L, t = int(la[k]), int(ta[k])
    ok = b.fits(cap, T, L, t)
    n = len(ok)
    proj = b.cost[:n] + (cap - b.tok[:n]) * (1.0 + d)     # the packs' projections
    j = int(np.where(ok, proj, np.inf).argmin() if a >= 0 else np.where(ok, proj, -np.inf).argmax()) if n else 0
    if not n or not ok[j]:
        j = b.open()
    b.add(j, int(idx[k]), L, t, float(c[k]))


def _repair(b: _Batch, cap: int, T: int, left: list[int], items, known: dict) -> list[int]:
    """Swap left-over samples into packs for shorter members while that fills them better.
    ``left``: positions in the batch; returns the samples (indices) still left over."""
    idx, la = items[0], items[1]

    def info(i: int) -> tuple[int, int, float]:
        return _sample(items, known, i)

    by_len: dict[int, list[int]] = {}
    for k in left:
        by_len.setdefault(int(la[k]), []).append(int(idx[k]))
    has = bytearray(cap + 1)
    for n in by_len:
        has[n] = 1
    for _ in range(REPAIR_PASSES):
        moved = 0
        for j, mem in enumerate(b.members):
            room = cap - int(b.tok[j])
            if room <= 0 or not mem:
                continue
            for pos in sorted(range(len(mem)), key=lambda q: (info(mem[q])[0], q)):
                s, t1, c1 = info(mem[pos])
                n2 = has.rfind(1, s + 1, min(cap, s + room) + 1)
                if n2 < 0:
                    continue
                _, t2, c2 = info(by_len[n2][-1])
                if T and b.til[j] + t2 - t1 > T:
                    continue
                i2 = by_len[n2].pop()
                if not by_len[n2]:
                    has[n2] = 0
                by_len.setdefault(s, []).append(mem[pos])
                has[s] = 1
                mem[pos] = i2
                b.tok[j] += n2 - s
                b.til[j] += t2 - t1
                b.cost[j] += c2 - c1
                room -= n2 - s
                moved += 1
                if room <= 0:
                    break
        if not moved:
            break
    return sorted(i for ids in by_len.values() for i in ids)
