"""The pure packer: exact small cases per strategy, properties over random streams, quality."""

import itertools
import math

import numpy as np
import pytest

from vlmft.data.packing import Limits, layout, lower_bound, offline_bfd, pack

STRATEGIES = ["best_fit", "next_fit", "internvl"]


def fill(lengths, packs, cap):
    return sum(lengths) / (len(packs) * cap)


# ---------------------------------------------------------------- layout, lower bound

def test_layout_exact_values():
    pos, sid, cu = layout([3, 2, 4])
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert sid.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert cu.tolist() == [0, 3, 5, 9]
    assert (pos.dtype, sid.dtype, cu.dtype) == (np.int64, np.int64, np.int32)
    pos, sid, cu = layout([1])
    assert (pos.tolist(), sid.tolist(), cu.tolist()) == ([0], [0], [0, 1])
    assert [a.tolist() for a in layout([])] == [[], [], [0]]
    with pytest.raises(ValueError):
        layout([2, 0])


def test_lower_bound():
    assert lower_bound([5, 5, 1], 10) == 2
    assert lower_bound([10, 10], 10) == 2
    assert lower_bound(np.array([1]), 8192) == 1
    assert lower_bound([], 10) == 0


# ---------------------------------------------------------------- properties, all strategies

def _check(packs, lengths, tiles, limits):
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths))), "every sample in exactly one pack"
    for p in packs:
        assert p and p == sorted(p)
        assert sum(lengths[i] for i in p) <= limits.max_tokens
        if limits.max_tiles and tiles is not None:
            assert sum(tiles[i] for i in p) <= limits.max_tiles


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_sample_once_and_limits_hold(strategy):
    rng = np.random.default_rng(1)
    for trial in range(25):
        cap = int(rng.integers(8, 300))
        n = int(rng.integers(0, 400))
        lengths = rng.integers(1, cap + 1, n).tolist()
        max_tiles = int(rng.choice([0, 1, 3, 7]))
        tiles = None if trial % 4 == 0 else rng.integers(0, max(max_tiles, 3) + 1, n).tolist()
        if tiles is not None and max_tiles:
            tiles = [min(t, max_tiles) for t in tiles]
        limits = Limits(cap, max_tiles)
        kw = dict(strategy=strategy, window=int(rng.integers(1, 80)), max_open=int(rng.integers(1, 9)),
                  allow_overflow=bool(trial % 2))
        if strategy == "best_fit" and trial % 3 == 1:
            kw["compute"] = (float(rng.choice([50, 5000])), float(rng.choice([0, 64])))
        packs = list(pack(lengths, tiles, limits, **kw))
        _check(packs, lengths, tiles, limits)
        # numpy input and a lazy generator give the same packs as a list
        assert list(pack(np.array(lengths, dtype=np.int64), tiles, limits, **kw)) == packs
        gen_t = None if tiles is None else (t for t in tiles)
        assert list(pack((x for x in lengths), gen_t, limits, **kw)) == packs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streams_with_bounded_reading(strategy):
    """An endless stream still yields packs; best_fit reads exactly one window ahead."""
    read = 0

    def endless():
        nonlocal read
        for x in itertools.cycle([3, 5, 7, 2]):
            read += 1
            yield x

    it = pack(endless(), None, Limits(10), strategy=strategy, window=16, max_open=4)
    first = next(it)
    assert first and read <= (16 if strategy == "best_fit" else 8192)
    rest = list(itertools.islice(it, 20))
    assert all(sum([3, 5, 7, 2][i % 4] for i in p) <= 10 for p in [first] + rest)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rejects_what_the_caller_should_have_dropped(strategy):
    with pytest.raises(ValueError, match="sample 2: length 11"):
        list(pack([3, 4, 11], None, Limits(10), strategy=strategy))
    with pytest.raises(ValueError, match="sample 1: length 0"):
        list(pack([3, 0], None, Limits(10), strategy=strategy))
    with pytest.raises(ValueError, match="sample 0: 3 tiles"):
        list(pack([3, 4], [3, 0], Limits(10, 2), strategy=strategy))
    with pytest.raises(ValueError, match="tiles has 1 entries"):
        list(pack([3, 4], [0], Limits(10), strategy=strategy))


def test_bad_arguments_fail_before_the_first_pack():
    with pytest.raises(ValueError, match="strategy"):
        pack([1], None, Limits(10), strategy="first_fit")
    with pytest.raises(ValueError, match="compute balancing"):
        pack([1], None, Limits(10), strategy="internvl", compute=(100.0, 1.0))
    with pytest.raises(ValueError, match="compute balancing"):
        pack([1], None, Limits(10), compute=(0.0, 1.0))
    with pytest.raises(ValueError, match="window"):
        pack([1], None, Limits(10), window=0)
    with pytest.raises(ValueError, match="max_tokens"):
        pack([1], None, Limits(0))


# ---------------------------------------------------------------- next_fit

def test_next_fit_fills_in_order_and_emits_when_the_next_does_not_fit():
    assert list(pack([4, 3, 5, 2, 2, 6], None, Limits(8), strategy="next_fit")) == \
        [[0, 1], [2, 3], [4, 5]]
    # a later small sample never goes back into an emitted pack
    assert list(pack([6, 5, 1], None, Limits(8), strategy="next_fit")) == [[0], [1, 2]]
    # the tile limit also ends a pack
    assert list(pack([1, 1, 1, 1], [1, 1, 1, 0], Limits(10, 2), strategy="next_fit")) == \
        [[0, 1], [2, 3]]


def test_next_fit_packs_are_contiguous_runs_of_the_stream():
    lengths = np.random.default_rng(3).integers(1, 100, 500).tolist()
    packs = list(pack(lengths, None, Limits(128), strategy="next_fit"))
    assert [i for p in packs for i in p] == list(range(500))
    for p, q in zip(packs, packs[1:]):   # emitted only because the next one did not fit
        assert sum(lengths[i] for i in p) + lengths[q[0]] > 128


# ---------------------------------------------------------------- internvl

def test_internvl_reproduces_packed_dataset_decisions():
    """Hand-traced against InternVL's PackedDataset (find_buffer, update_buffer_list, __iter__):
    cap 10, num_images_expected 4, max_buffer_size 2; buffer list shown most tiles first.
      0 (6,1): new A                                   [A(6,1)]
      1 (5,2): A has no token room -> new B            [B(5,2), A(6,1)]
      2 (4,1): FIRST fit is B (A also fits exactly)    [B(9,3), A(6,1)]
      3 (3,0): B no room, A fits                        [B(9,3), A(9,1)]
      4 (2,1): no fit -> new C; 3 > 2 buffers: emit B (most tiles)        -> [1, 2]
      5 (1,1): A reaches 10 tokens: emitted                                -> [0, 3, 5]
      6 (3,3): C reaches 4 tiles = num_images_expected: emitted            -> [4, 6]
      7 (5,0): new D; end of stream flushes it                             -> [7]"""
    lengths = [6, 5, 4, 3, 2, 1, 3, 5]
    tiles = [1, 2, 1, 0, 1, 1, 3, 0]
    packs = list(pack(lengths, tiles, Limits(10, 4), strategy="internvl", max_open=2))
    assert packs == [[1, 2], [0, 3, 5], [4, 6], [7]]


def test_internvl_evicts_the_oldest_among_equal_tiles_and_first_fit_is_not_best_fit():
    # no tiles: buffers are kept in order of last change; the first with room wins
    packs = list(pack([6, 7, 3, 1, 4], None, Limits(10), strategy="internvl", max_open=2))
    # 0 -> A(6); 1 -> B(7) [A, B]; 2 (3): A first with room -> A(9) [B, A];
    # 3 (1): B first -> B(8) [A, B]; 4 (4): no room -> C, 3 > 2: emit A; end: B, C
    assert packs == [[0, 2], [1, 3], [4]]


def test_internvl_allow_overflow_emits_the_last_tile_fitting_buffer_instead_of_splitting():
    kw = dict(strategy="internvl", allow_overflow=True)
    # with >= max_buffer_size // 2 buffers held and no fit, InternVL merges into the LAST
    # buffer with tile room and cuts it at max_tokens; we emit that buffer whole instead
    assert list(pack([6, 7, 8, 9], None, Limits(10), max_open=4, **kw)) == [[1], [2], [0], [3]]
    assert list(pack([6, 7, 4], None, Limits(10), max_open=2, **kw)) == [[0], [1], [2]]
    assert list(pack([6, 7, 4], None, Limits(10), max_open=2, strategy="internvl")) == [[0, 2], [1]]


def test_internvl_evicts_the_head_when_over_max_buffer_size_and_full_tile_buffers_at_once():
    assert list(pack([3, 8, 8, 2], None, Limits(10), strategy="internvl", max_open=1)) == \
        [[0], [1], [2, 3]]
    # a buffer holding exactly num_images_expected tiles is emitted as soon as it does
    assert list(pack([2, 5, 3], [2, 0, 0], Limits(10, 2), strategy="internvl", max_open=4)) == \
        [[0], [1, 2]]


# ---------------------------------------------------------------- best_fit

def test_best_fit_is_best_fit_decreasing_within_a_window():
    lengths = [5, 4, 3, 3, 2, 1]
    # 5 -> A(3 left); 4 -> B(4 left); 3 -> A (least room that fits): full; 3 -> B(1 left);
    # 2 -> no room -> C; 1 -> B (1 left): full; C flushed at the end
    assert list(pack(lengths, None, Limits(8), window=6)) == [[0, 2], [1, 3, 5], [4]]
    assert offline_bfd(lengths, 8) == [[0, 2], [1, 3, 5], [4]]


def test_best_fit_carries_the_emptiest_packs_to_the_next_window():
    # window 2, one pack may stay open: after [9, 2] the fuller (9) goes, the 2 waits and
    # takes the 8 of the next window
    assert list(pack([9, 2, 8, 1], None, Limits(10), window=2, max_open=1)) == [[0], [1, 2], [3]]


def test_best_fit_with_one_window_is_offline_bfd():
    lengths = np.random.default_rng(5).integers(1, 500, 3000)
    ours = list(pack(lengths, None, Limits(1024), window=len(lengths)))
    assert sorted(ours) == offline_bfd(lengths, 1024)


def test_best_fit_respects_tiles():
    # three 1-tile samples, at most 2 tiles a pack: the third must open a new pack
    assert list(pack([3, 3, 3], [1, 1, 1], Limits(10, 2))) == [[0, 1], [2]]
    # a text-only sample still fits a pack whose tiles are used up
    assert list(pack([3, 3, 4], [1, 1, 0], Limits(10, 2))) == [[0, 1, 2]]
    # with max_tiles 0 tiles are not limited
    assert list(pack([3, 3, 3], [5, 5, 5], Limits(10))) == [[0, 1, 2]]


def test_best_fit_quality_on_a_lognormal_stream():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(math.log(600), 0.8, 5000)), 16, 8192).astype(np.int64)
    ls = lengths.tolist()
    ours = list(pack(lengths, None, Limits(8192), window=4096, max_open=64))
    nf = list(pack(lengths, None, Limits(8192), strategy="next_fit"))
    off = offline_bfd(lengths, 8192)
    f_ours, f_nf, f_off = fill(ls, ours, 8192), fill(ls, nf, 8192), fill(ls, off, 8192)
    assert f_ours > f_nf + 0.05
    assert f_ours >= f_off - 0.002
    assert len(off) - lower_bound(ls, 8192) <= 1
