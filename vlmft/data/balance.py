"""Deal an optimizer step's packs to (rank, micro-batch) by estimated compute.

Equal token counts are not equal work: attention grows with the square of each sample's length
(Zeppelin), and images add vision-tower work. A pack's estimated cost, in token units, is

    cost = tokens + sum(L_s^2) / L*  + tile_cost x tiles

with L* = ``data.attention_cost_length`` (the sample length at which a sample's attention costs
as much as its linear layers, about 12 x the hidden size: linear ~24 d^2 flops a token, causal
attention ~2 d flops a token pair) and ``data.tile_cost`` the vision tower's cost of one tile
in language-model tokens.

``assign`` (deterministic; every rank computes the whole assignment and keeps its own part):
the step's G = world x micro_batch_size x grad_accum_steps packs are sorted by cost (ties by
position) and cut into rows of ``world`` packs of similar cost; micro-batch slot m holds rows
[m x mbs, (m+1) x mbs). Row by row, the row's packs, largest first, go to the ranks in order of
(load in this slot, load in this step, rank), each rank taking exactly one pack per row. So
every rank gets exactly micro_batch_size x grad_accum_steps packs (ranks never disagree on the
number of micro-batches), the largest packs of a slot sit on different ranks (what matters
when ranks synchronize every micro-batch, ZeRO-3) and each step's per-rank totals are
balanced like longest-processing-time-first.

``round_robin`` is the simple deal: pack j to rank j % world, micro-batches in order.

With one pack a rank (micro_batch_size x grad_accum_steps = 1) a deal can only permute whole
packs, so the packs themselves must cost the same (``data.packing.balance_compute``): the packer
aims every pack at the same cost (vlmft/data/compute_packing.py), and ``group_steps`` orders a
round's packs so that the packs the packer could not bring near the round's median cost (a
pack holding one sample of a full row costs what it costs) share steps with packs of similar
cost:

    m = the round's median pack cost; a pack is *regular* when |cost / m - 1| <= BAND (1%)
    the round's first ``head`` packs (they complete the step the previous round began) and its
    last (n - head) % G packs (the step the next round completes) are the regular packs
    nearest m; the other packs, sorted by cost, are cut into blocks of G: a block of regular
    packs only gives its packs back to a pool that is dealt, in the round's random order, into
    steps; a block holding an outlier stays a step of similar costs; the steps are shuffled.

So a step is either G regular packs in random order (max/mean <= (1 + BAND) / (1 - BAND)) or
G neighbours in cost; the share of the second kind is what the packer keeps small.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Assignment = list[list[list[int]]]   # [rank][micro_batch] -> positions in the step's pack list
BAND = 0.01                          # group_steps: a regular pack is within 1% of the median cost


def sample_costs(lengths, tiles, *, attention_length: float, tile_cost: float) -> np.ndarray:
    """Estimated cost of each sample, in token units (float64); a pack's cost is the sum."""
    L = np.asarray(lengths, dtype=np.float64)
    per = L + L * L / float(attention_length)
    if tiles is not None and tile_cost:
        per = per + float(tile_cost) * np.asarray(tiles, dtype=np.float64)
    return per


def pack_costs(lengths: np.ndarray, tiles: np.ndarray | None, packs: Sequence[Sequence[int]], *,
               attention_length: float, tile_cost: float) -> np.ndarray:
    """Estimated cost of each pack; ``lengths``/``tiles`` are per sample, packs list samples."""
    sizes = np.fromiter((len(p) for p in packs), dtype=np.int64, count=len(packs))
    if sizes.size == 0:
        return np.zeros(0)
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(sizes.sum()))
    per = sample_costs(np.asarray(lengths)[flat], None if tiles is None else np.asarray(tiles)[flat],
                       attention_length=attention_length, tile_cost=tile_cost)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.zeros(len(packs))
    nz = sizes > 0
    out[nz] = np.add.reduceat(per, starts[nz])
    return out


def assign(costs: Sequence[float], world: int, micro_batch_size: int, grad_accum_steps: int) -> Assignment:
    """Balanced deal of one step's packs (see the module doc)."""
    c = np.asarray(costs, dtype=np.float64)
    G = world * micro_batch_size * grad_accum_steps
    if len(c) != G:
        raise ValueError(f"{len(c)} packs for world {world} x micro_batch_size {micro_batch_size} "
                         f"x grad_accum_steps {grad_accum_steps} = {G}")
    order = np.lexsort((np.arange(G), -c))        # largest first, ties by position
    out: Assignment = [[[] for _ in range(grad_accum_steps)] for _ in range(world)]
    total = np.zeros(world)
    ranks = np.arange(world)
    for m in range(grad_accum_steps):
        slot = np.zeros(world)
        for r in range(micro_batch_size):
            row = order[(m * micro_batch_size + r) * world:(m * micro_batch_size + r + 1) * world]
            takers = np.lexsort((ranks, total, slot))  # least loaded in the slot, then the step
            for j, rank in zip(row.tolist(), takers.tolist()):
                out[rank][m].append(j)
                slot[rank] += c[j]
                total[rank] += c[j]
    for per_rank in out:
        for mb in per_rank:
            mb.sort()
    return out


def group_steps(costs: Sequence[float], G: int, head: int, rng: np.random.Generator) -> list[int]:
    """A round's pack order (positions into ``costs``) in which each step's G packs cost alike
    (see the module doc); ``head`` = how many of the round's first packs complete a step the
    previous round began. Deterministic in (costs, G, head, rng)."""
    c = np.asarray(costs, dtype=np.float64)
    n = len(c)
    tail = (n - head) % G if n > head else 0
    if n <= head or n - head - tail == 0:
        return list(range(n))
    m = float(np.median(c))
    regular = np.abs(c - m) <= BAND * m
    near = np.lexsort((np.arange(n), np.abs(c - m)))          # nearest the median first
    edge = np.sort(near[:head + tail])                         # fragments, in the round's order
    rest = np.setdiff1d(np.arange(n), edge)
    rest = rest[np.lexsort((rest, c[rest]))]                   # by cost, ties by position
    blocks = rest.reshape(-1, G)
    mixed = regular[blocks].all(axis=1)
    pool = np.sort(blocks[mixed].reshape(-1))                  # back in the round's random order
    steps = [b.tolist() for b in blocks[~mixed]] + pool.reshape(-1, G).tolist()
    order = rng.permutation(len(steps)).tolist()
    return edge[:head].tolist() + [j for k in order for j in steps[k]] + edge[head:].tolist()


def grouped_share(costs: Sequence[float], G: int) -> float:
    """Share of a round's steps (consecutive G packs from position 0) holding a pack off the
    median by more than BAND: the steps group_steps had to form by cost."""
    c = np.asarray(costs, dtype=np.float64)
    steps = len(c) // G
    if not steps:
        return 0.0
    m = float(np.median(c))
    off = (np.abs(c[:steps * G] - m) > BAND * m).reshape(steps, G).any(axis=1)
    return float(off.mean())


def round_robin(num_packs: int, world: int, micro_batch_size: int) -> Assignment:
    """Pack j to rank j % world; a rank's packs fill its micro-batches in order."""
    out = []
    for rank in range(world):
        mine = list(range(rank, num_packs, world))
        out.append([mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)])
    return out


def loads(costs: Sequence[float], a: Assignment) -> np.ndarray:
    """[rank, micro_batch] estimated compute."""
    c = np.asarray(costs, dtype=np.float64)
    return np.array([[c[mb].sum() if mb else 0.0 for mb in per_rank] for per_rank in a])


def balance_report(packs_costs: Sequence[float], world: int, per_rank: int,
                   micro_batch_size: int = 1) -> dict:
    """Per-rank load of the balanced deal against round-robin over consecutive steps.

    ``packs_costs``: the cost of each pack in plan order (step k = packs [kG, (k+1)G), G =
    world x per_rank; a short tail is left out); ``per_rank`` = micro_batch_size x
    grad_accum_steps. For each method: ``max_over_mean`` = per step, the most loaded rank's
    compute over the mean rank's (mean, p99 and worst over steps; 1.0 is perfect; a step takes
    as long as its slowest rank), and ``sync_max_over_mean`` = per step, sum over micro-batches
    of the slowest rank's micro-batch over the mean (what a step costs when ranks wait for one
    another every micro-batch, as under ZeRO-3), averaged over steps.
    """
    if per_rank % micro_batch_size:
        raise ValueError(f"per_rank {per_rank} is not a multiple of micro_batch_size {micro_batch_size}")
    gas = per_rank // micro_batch_size
    G = world * per_rank
    c = np.asarray(packs_costs, dtype=np.float64)
    steps = len(c) // G
    out = {"world": world, "per_rank": per_rank, "micro_batch_size": micro_batch_size,
           "steps": steps}
    rr = round_robin(G, world, micro_batch_size)
    for name in ("balanced", "round_robin"):
        ratios, sync = [], []
        for k in range(steps):
            sc = c[k * G:(k + 1) * G]
            a = assign(sc, world, micro_batch_size, gas) if name == "balanced" else rr
            ld = loads(sc, a)
            mean = ld.sum() / world
            if mean <= 0:
                continue
            ratios.append(ld.sum(axis=1).max() / mean)
            sync.append(ld.max(axis=0).sum() / mean)
        r = np.asarray(ratios) if ratios else np.ones(1)
        out[name] = {"max_over_mean": float(r.mean()), "p99": float(np.percentile(r, 99)),
                     "worst": float(r.max()),
                     "sync_max_over_mean": float(np.mean(sync)) if sync else 1.0}
    return out
