"""Which samples share a packed row: a pure planner over lengths (and image tiles).

A pack is a list of sample indices whose lengths sum to at most ``max_tokens``. Laid out
as one row (here samples 0, 1, 2 of lengths 3, 2, 4 in a 10-token row; token id = sample
id so the row is readable, ``.`` is unused room)::

    tokens        0 0 0 1 1 2 2 2 2 .
    sample_ids    0 0 0 1 1 2 2 2 2
    position_ids  0 1 2 0 1 0 1 2 3      <- restart at 0 for every sample
    cu_seqlens    [0, 3, 5, 9]           <- sample k is tokens cu[k]:cu[k+1]

``layout(lengths)`` returns exactly these three. ``pack`` streams packs; the strategies:

best_fit (default, ours)
    Best-fit-decreasing over batches of ``window`` samples: a batch is sorted (numpy),
    longest first, and each sample goes into the open pack with the least token room that
    still fits it, or opens a new pack. Full packs close at once; at the end of a batch the
    fullest open packs close too until at most ``max_open`` (the emptiest) stay open for
    the next batch, and the closed ones are emitted. So at most ``window`` pending samples
    and ``max_open`` carried-over packs are held. Open packs are indexed by their room in a
    bytearray, so "least room >= L" is one ``bytearray.find`` (C memchr): >1M samples/s in
    pure Python. With a tile limit, samples are taken by decreasing L/max_tokens +
    t/max_tiles and only packs with t tiles left are candidates (~0.3M samples/s). With
    window >= len(stream) this is offline best-fit-decreasing (``offline_bfd``).
    With ``compute`` (``data.packing.balance_compute``) the packs of a batch are aimed at
    equal modelled compute as well as full rows: vlmft/data/compute_packing.py.

next_fit
    Fill in stream order; when the next sample does not fit, emit and start a new pack
    (torchtune, ms-swift sequential, LLaMA-Factory v1). One open pack; ``window``,
    ``max_open``, ``allow_overflow`` do not apply.

internvl
    The grouping decisions of InternVL's ``PackedDataset`` (internvl_chat/internvl/train/
    dataset_packed.py), with ``max_open`` = its ``max_buffer_size`` and ``max_tiles`` = its
    ``num_images_expected`` (0 here means no tile limit, which InternVL has no mode for).
    Reproduced: buffers are kept in InternVL's order, most tiles first, a re-filled or new
    buffer inserted after every buffer with at least as many tiles (``update_buffer_list``);
    a sample goes into the FIRST buffer in that order with room for its tiles and tokens
    (``find_buffer``); a buffer that reaches max_tokens is emitted, then buffers holding
    exactly max_tiles tiles, then while more than max_open buffers are held the first one
    (the most tiles) is emitted; at the end of the stream the rest in list order.
    ``allow_overflow``: as in InternVL, when no buffer fits and at least max_open // 2 are
    held, the LAST buffer with room for the tiles is chosen for an overflowing merge.
    InternVL then cuts the merged tokens at max_tokens (cutting the sample, dropping text
    up to its next image and any piece without an image) and emits the first part; we
    never split or drop: that buffer is emitted as it is and the sample opens a new one.
    Not reproduced: InternVL's ``strict_mode`` (it pads the tiles of evicted buffers with
    zero images up to num_images_expected and changes no grouping; vlmft never pads, so the
    recipe refuses it) and its ``check_valid`` ratio, which here is a sample filter for every
    strategy (``data.packing.min_active_tokens_ratio``, applied by vlmft/data/catalog.py).

Every strategy lists a pack's members in increasing index order; best_fit emits the packs
closed in a batch in stream order of their first sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice, repeat
from typing import Iterable, Iterator, Sequence

import numpy as np

from .compute_packing import best_fit_compute

STRATEGIES = ("best_fit", "next_fit", "internvl")


@dataclass(frozen=True)
class Limits:
    max_tokens: int          # capacity of a row
    max_tiles: int = 0       # most image tiles in one pack, 0 = no limit


def pack(lengths: Iterable[int], tiles: Iterable[int] | None, limits: Limits, *,
         strategy: str = "best_fit", window: int = 4096, max_open: int = 64,
         allow_overflow: bool = False, compute: tuple[float, float] | None = None) -> Iterator[list[int]]:
    """Stream: yields packs as lists of sample indices (into lengths), bounded memory
    (at most `window` pending samples and `max_open` open packs). Every index with
    lengths[i] <= max_tokens (and tiles[i] <= max_tiles when max_tiles>0) appears in exactly one
    pack; the caller has already dropped/truncated over-long samples (ValueError if not).
    tiles may be None (no images). ``allow_overflow`` applies to internvl only; ``compute`` =
    (attention_cost_length, tile_cost) makes best_fit balance the packs' modelled compute
    (vlmft/data/compute_packing.py). Arguments are checked here, before the first pack."""
    cap, max_tiles = int(limits.max_tokens), int(limits.max_tiles)
    if cap < 1 or max_tiles < 0:
        raise ValueError(f"limits: max_tokens must be >= 1 and max_tiles >= 0, got {limits}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if window < 1 or max_open < 1:
        raise ValueError(f"window and max_open must be >= 1, got {window} and {max_open}")
    if compute is not None and (strategy != "best_fit" or min(compute) < 0 or compute[0] <= 0):
        raise ValueError(f"compute balancing needs strategy best_fit, attention_cost_length > 0 and "
                         f"tile_cost >= 0, got {strategy} and {compute}")
    chunks = _chunks(lengths, tiles, cap, max_tiles, window if strategy == "best_fit" else 8192)
    if compute is not None:
        return best_fit_compute(chunks, cap, max_tiles, max_open, attention_length=compute[0],
                                tile_cost=compute[1])
    if strategy == "best_fit" and tiles is not None and max_tiles:
        return _best_fit_tiles(chunks, cap, max_tiles, max_open)
    if strategy == "best_fit":
        return _best_fit(chunks, cap, max_open)
    if strategy == "next_fit":
        return _next_fit(_items(chunks), cap, max_tiles)
    return _internvl(_items(chunks), cap, max_tiles, max_open, allow_overflow)


def offline_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing over the whole stream at once: the reference for best_fit. Packs
    in order of their first sample, members sorted."""
    n = len(lengths)
    return _ordered(list(_best_fit(_chunks(lengths, None, capacity, 0, max(n, 1)), capacity, 1)))


def lower_bound(lengths: Iterable[int], capacity: int) -> int:
    """No packing needs fewer rows than ceil(total tokens / capacity)."""
    return -(-int(np.fromiter(lengths, dtype=np.int64).sum()) // capacity)


def layout(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position_ids, sample_ids, cu_seqlens) of one row holding samples of these lengths:
    positions restart at 0 per sample (int64), sample ids 0..k-1 (int64), cu_seqlens
    [0, l0, l0+l1, ...] (int32, as flash-attention's varlen kernels want)."""
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (lens < 1).any():
        raise ValueError(f"layout: every length must be >= 1, got {lens.tolist()}")
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    sample_ids = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    position_ids = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lens)
    return position_ids, sample_ids, cu.astype(np.int32)


# ---------------------------------------------------------------- input in checked batches

def _chunks(lengths, tiles, cap: int, max_tiles: int, size: int):
    """Yield (start, lengths int64 array, tiles int64 array or None) batches of <= size,
    checking every sample against the limits. Sequences are sliced, iterables read lazily."""
    seq = hasattr(lengths, "__len__") and hasattr(lengths, "__getitem__")
    tseq = tiles is None or (hasattr(tiles, "__len__") and hasattr(tiles, "__getitem__"))
    if seq and tseq:
        if tiles is not None and len(tiles) != len(lengths):
            raise ValueError(f"tiles has {len(tiles)} entries for {len(lengths)} lengths")
        n = len(lengths)
        parts = ((lengths[s:s + size], None if tiles is None else tiles[s:s + size])
                 for s in range(0, n, size))
    else:
        lit = iter(lengths)
        tit = None if tiles is None else iter(tiles)
        def parts():  # noqa: E306
            while True:
                ls = list(islice(lit, size))
                ts = None if tit is None else list(islice(tit, len(ls)))
                if ts is not None and len(ts) != len(ls):
                    raise ValueError("tiles ended before lengths")
                if not ls:
                    return
                yield ls, ts
        parts = parts()
    start = 0
    for ls, ts in parts:
        la = np.asarray(ls, dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((la < 1) | (la > cap))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"sample {start + i}: length {int(la[i])} outside [1, {cap}]; drop "
                             "or truncate over-long samples before packing")
        ta = None
        if ts is not None:
            ta = np.asarray(ts, dtype=np.int64).reshape(-1)
            bad = np.flatnonzero((ta < 0) | (ta > max_tiles) if max_tiles else ta < 0)
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"sample {start + i}: {int(ta[i])} tiles outside "
                                 f"[0, {max_tiles or 'inf'}]")
            if not ta.any():
                ta = None
        yield start, la, ta
        start += len(la)


def _items(chunks):
    """(index, length, tiles) per sample, in stream order."""
    for start, la, ta in chunks:
        yield from zip(range(start, start + len(la)), la.tolist(),
                       repeat(0) if ta is None else ta.tolist())


# ---------------------------------------------------------------- best_fit

def _best_fit(chunks, cap: int, max_open: int) -> Iterator[list[int]]:
    """Tokens only. Open packs are indexed by room: by_room[r] holds the member lists of the
    packs with r tokens left and has_room[r] says whether it is non-empty, so the best fit
    for L is has_room.find(1, L) and the fullest pack has_room.find(1)."""
    has_room = bytearray(cap + 1)
    by_room: list[list[list[int]]] = [[] for _ in range(cap + 1)]
    find = has_room.find
    n_open = 0
    for start, la, _ in chunks:
        # longest first, ties in stream order (int16 keys sort by radix)
        order = np.argsort((cap - la).astype(np.int16 if cap < 32768 else np.int64), kind="stable")
        closed = []
        for i, L in zip((order + start).tolist(), la[order].tolist()):
            r = find(1, L)
            if r < 0:
                p = [i]
                n_open += 1
                r = cap - L
            else:
                s = by_room[r]
                p = s.pop()
                if not s:
                    has_room[r] = 0
                p.append(i)
                r -= L
            if r:
                by_room[r].append(p)
                has_room[r] = 1
            else:
                closed.append(p)
                n_open -= 1
        while n_open > max_open:       # the fullest (least room) go, the emptiest wait
            r = find(1)
            s = by_room[r]
            closed.append(s.pop())
            if not s:
                has_room[r] = 0
            n_open -= 1
        yield from _ordered(closed)
    rest, r = [], find(1)              # end of the stream
    while r >= 0:
        rest += by_room[r]
        r = find(1, r + 1)
    yield from _ordered(rest)


def _ordered(packs: list[list[int]]) -> list[list[int]]:
    """Members sorted, packs in stream order of their first sample."""
    for p in packs:
        p.sort()
    packs.sort(key=_first)
    return packs


def _first(p: list[int]) -> int:
    return p[0]


def _best_fit_tiles(chunks, cap: int, T: int, max_open: int):
    """Tokens and tiles. Samples are taken by decreasing L/cap + t/T (their share of both
    budgets, so tile-heavy short samples are not all left to the end), and each goes to the
    pack with the least token room >= L among those with >= t tiles left (ties: fewest
    tiles left). Index: ok[tau * (cap+1) + r] == 1 when an open pack has r tokens and at
    least tau tiles left, so the best fit is one find in row t; a pack sets its column
    for tau <= rho with one strided slice. As in _best_fit, the packs with the least token
    room are evicted first."""
    W = cap + 1
    ok = bytearray(W * (T + 1))
    at_room: list[list[int]] = [[] for _ in range(W)]   # r -> ids of open packs with r left
    members: dict[int, list[int]] = {}
    left: dict[int, tuple[int, int]] = {}               # open pack id -> (r, rho)
    new_id = 0

    def take(b):
        r, rho = left.pop(b)
        s = at_room[r]
        s.remove(b)
        m = max([left[c][1] for c in s]) if s else -1
        if m < rho:
            ok[(m + 1) * W + r:(rho + 1) * W:W] = bytes(rho - m)

    def room_left(b):
        return left[b][0]

    for start, la, ta in chunks:
        if ta is None:
            ta = np.zeros_like(la)
        order = np.argsort(-(la * T + ta * cap), kind="stable")
        closed = []
        for i, L, t in zip((order + start).tolist(), la[order].tolist(), ta[order].tolist()):
            pos = ok.find(1, t * W + L, t * W + W)
            if pos < 0:
                b, r, rho = new_id, cap, T
                new_id += 1
                members[b] = []
            else:
                s = at_room[pos - t * W]
                b = s[0] if len(s) == 1 else min(
                    (c for c in s if left[c][1] >= t), key=lambda c: left[c][1])
                r, rho = left[b]
                take(b)
            members[b].append(i)
            r, rho = r - L, rho - t
            if r:
                left[b] = (r, rho)
                at_room[r].append(b)
                ok[r:(rho + 1) * W:W] = b"\x01" * (rho + 1)
            else:
                closed.append(members.pop(b))
        if len(members) > max_open:
            for b in sorted(members, key=room_left)[:len(members) - max_open]:
                take(b)
                closed.append(members.pop(b))
        yield from _ordered(closed)
    yield from _ordered(list(members.values()))


# ---------------------------------------------------------------- next_fit

def _next_fit(items, cap: int, max_tiles: int) -> Iterator[list[int]]:
    cur: list[int] = []
    tok = til = 0
    for i, L, t in items:
        if cur and (tok + L > cap or (max_tiles and til + t > max_tiles)):
            yield cur
            cur, tok, til = [], 0, 0
        cur.append(i)
        tok += L
        til += t
    if cur:
        yield cur


# ---------------------------------------------------------------- internvl

def _internvl(items, cap: int, max_tiles: int, max_buffer: int,
              allow_overflow: bool) -> Iterator[list[int]]:
    tile_cap = max_tiles or float("inf")
    bufs: list[list] = []    # [tokens, tiles, members], InternVL's buffer_list order
    for i, L, t in items:
        pick, over = -1, False
        for k, b in enumerate(bufs):                               # find_buffer
            if b[1] + t <= tile_cap:
                if b[0] + L <= cap:
                    pick, over = k, False
                    break
                if allow_overflow and len(bufs) >= max_buffer // 2:
                    pick, over = k, True
        if pick >= 0 and not over:
            b = bufs.pop(pick)
            b[0] += L
            b[1] += t
            b[2].append(i)
        else:
            if over:                                               # instead of split_buffer
                yield bufs.pop(pick)[2]
            b = [L, t, [i]]
        if b[0] >= cap:                                            # buffer_max_len_list
            yield b[2]
        else:                                                      # update_buffer_list
            k = next((k for k, o in enumerate(bufs) if o[1] < b[1]), len(bufs))
            bufs.insert(k, b)
        while max_tiles and bufs and bufs[0][1] == max_tiles:      # exactly num_images_expected
            yield bufs.pop(0)[2]
        while len(bufs) > max_buffer:                              # more than max_buffer_size
            yield bufs.pop(0)[2]
    for b in bufs:
        yield b[2]
