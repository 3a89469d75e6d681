"""vlmft.loss: token weights, chunked fp32 CE, the step normalizer and its DeepSpeed algebra.

Single process, no deepspeed; the packed-vs-unpacked check runs a tiny InternVL built in code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlmft.loss import REDUCTIONS, chunks_needed, scaled_loss, step_is_empty, token_weights, weighted_ce_sum

from .loss_reference import local_weight_sum, micro_batch_sum, weighted_ce_sum_from_logits

X = -100


def packed_batch():
    """Two packed rows; token id = sample id (+ padding at -1).

    Row 0: sample 0 (3 tokens, 2 supervised), sample 1 (2 tokens, 1), sample 2 (4 tokens, 3),
    2 padding tokens. Row 1: sample 0 (4 tokens, 3 supervised), sample 1 (3 tokens, 1), 4 pads.
    Labels are already shifted: the last token of each sample is -100.
    """
    sids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1],
                         [0, 0, 0, 0, 1, 1, 1, -1, -1, -1, -1]])
    labels = torch.tensor([[7, 8, X, 9, X, 1, 2, 3, X, X, X],
                           [4, 5, 6, X, X, 7, X, X, X, X, X]])
    d = {(0, 0): 1.0, (0, 1): 2.0, (0, 2): 0.5, (1, 0): 1.0, (1, 1): 3.0}
    loss_weight = torch.zeros(sids.shape)
    for (r, s), v in d.items():
        loss_weight[r][sids[r] == s] = v
    return {"input_ids": sids.clamp(min=0), "labels": labels, "sample_ids": sids,
            "loss_weight": loss_weight}


def test_token_weights_hand_computed():
    b = packed_batch()
    r2, r3 = 1 / math.sqrt(2), 1 / math.sqrt(3)
    expected = {
        "token": [[1, 1, 0, 2, 0, .5, .5, .5, 0, 0, 0],
                  [1, 1, 1, 0, 0, 3, 0, 0, 0, 0, 0]],
        "sample": [[.5, .5, 0, 2, 0, .5 / 3, .5 / 3, .5 / 3, 0, 0, 0],
                   [1 / 3, 1 / 3, 1 / 3, 0, 0, 3, 0, 0, 0, 0, 0]],
        "square": [[r2, r2, 0, 2, 0, .5 * r3, .5 * r3, .5 * r3, 0, 0, 0],
                   [r3, r3, r3, 0, 0, 3, 0, 0, 0, 0, 0]],
    }
    for reduction in REDUCTIONS:
        w = token_weights(b["labels"], b["sample_ids"], b["loss_weight"], reduction)
        assert w.dtype == torch.float32 and w.shape == b["labels"].shape
        torch.testing.assert_close(w, torch.tensor(expected[reduction]), rtol=0, atol=1e-7)
    # Without loss_weight, d(s) = 1.
    w = token_weights(b["labels"], b["sample_ids"], None, "sample")
    assert w[0, :2].tolist() == [.5, .5] and w[0, 3].item() == 1.0
    with pytest.raises(ValueError, match="reduction"):
        token_weights(b["labels"], b["sample_ids"], None, "mean")


def test_sample_reduction_is_mean_of_sample_means_and_respects_d():
    torch.manual_seed(0)
    b = packed_batch()
    logits = torch.randn(*b["labels"].shape, 13)
    labels = b["labels"]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1),
                                           reduction="none", ignore_index=X).reshape(labels.shape)
    means, ds = [], []
    for r in range(2):
        for s in range(int(b["sample_ids"][r].max()) + 1):
            sup = (b["sample_ids"][r] == s) & (labels[r] != X)
            means.append(ce[r][sup].mean())
            ds.append(b["loss_weight"][r][b["sample_ids"][r] == s][0])
    means, ds = torch.stack(means), torch.stack(ds)

    w = token_weights(labels, b["sample_ids"], None, "sample")
    got = weighted_ce_sum_from_logits(logits, labels, w) / w.sum()
    torch.testing.assert_close(got, means.mean())
    w = token_weights(labels, b["sample_ids"], b["loss_weight"], "sample")
    got = weighted_ce_sum_from_logits(logits, labels, w) / w.sum()
    torch.testing.assert_close(got, (ds * means).sum() / ds.sum())
    # token: d-weighted mean over tokens.
    w = token_weights(labels, b["sample_ids"], b["loss_weight"], "token")
    sup = labels != X
    expect = (b["loss_weight"][sup] * ce[sup]).sum() / b["loss_weight"][sup].sum()
    torch.testing.assert_close(weighted_ce_sum_from_logits(logits, labels, w) / w.sum(), expect)


def _head_case(seed=0, dim=8, vocab=37):
    torch.manual_seed(seed)
    b = packed_batch()
    hidden = torch.randn(*b["labels"].shape, dim, requires_grad=True)
    head = nn.Linear(dim, vocab)
    labels = b["labels"].clamp(max=vocab - 1)
    labels[b["labels"] == X] = X
    w = token_weights(labels, b["sample_ids"], b["loss_weight"], "square")
    return hidden, head, labels, w


def _grads(loss, hidden, head):
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    loss.backward()
    return [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]


@pytest.mark.parametrize("chunk", [1, 3, 10, 11, 1000])  # 10 supervised tokens in all
def test_chunked_equals_plain(chunk):
    hidden, head, labels, w = _head_case()
    n_sup = int((w != 0).sum())
    assert n_sup == 10
    ref = weighted_ce_sum_from_logits(head(hidden), labels, w)
    ref_grads = _grads(ref, hidden, head)

    rows = []
    handle = head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    got = weighted_ce_sum(hidden, head, labels, w, chunk_size=chunk)
    fwd_rows = list(rows)
    got_grads = _grads(got, hidden, head)
    handle.remove()

    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    # Only supervised rows reach the head, at most chunk of them per call; backward recomputes.
    assert sum(fwd_rows) == n_sup and max(fwd_rows) <= chunk
    assert len(fwd_rows) == chunks_needed(n_sup, chunk)
    assert sum(rows) == 2 * n_sup and max(rows) <= chunk


def test_chunked_keeps_no_full_logits_for_backward():
    hidden, head, labels, w = _head_case(vocab=101)
    n_sup = int((w != 0).sum())
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        weighted_ce_sum_from_logits(head(hidden), labels, w)
    assert max(saved) >= n_sup * 101  # the plain path keeps full-row fp32 log-probs
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        weighted_ce_sum(hidden, head, labels, w, chunk_size=3)
    assert max(saved, default=0) < 3 * 101


def test_fixed_chunk_count_and_empty_input():
    hidden, head, labels, w = _head_case()
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    ref = weighted_ce_sum(hidden, head, labels, w, chunk_size=4)
    assert calls == [4, 4, 2]
    calls.clear()
    got = weighted_ce_sum(hidden, head, labels, w, chunk_size=4, n_chunks=5)
    assert calls == [4, 4, 2, 0, 0]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="n_chunks"):
        weighted_ce_sum(hidden, head, labels, w, chunk_size=4, n_chunks=2)

    # No supervised token: 0, one call on zero rows, zero (not missing) head gradients.
    calls.clear()
    zero = weighted_ce_sum(hidden, head, labels, torch.zeros_like(w), chunk_size=4)
    assert calls == [0] and zero.item() == 0.0
    zero.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0


def test_empty_step_is_skipped():
    b = packed_batch()
    for reduction in REDUCTIONS:
        assert local_weight_sum([b, b], reduction) > 0
        unsup = dict(b, labels=torch.full_like(b["labels"], X))
        w = local_weight_sum([unsup, unsup], reduction)
        assert w.item() == 0.0 and step_is_empty(w)
        zero_d = dict(b, loss_weight=torch.zeros_like(b["loss_weight"]))
        assert step_is_empty(local_weight_sum([zero_d], reduction))
        assert step_is_empty(local_weight_sum([], reduction))
    assert step_is_empty(float("nan")) and not step_is_empty(torch.tensor(0.25))


def _random_mb(gen, lengths, n_sup, vocab):
    """One row of samples with the given lengths, the last n_sup[i] targets of each supervised."""
    ids, labels, sids, d = [], [], [], []
    for i, (ln, ns) in enumerate(zip(lengths, n_sup)):
        tok = torch.randint(10, vocab, (ln,), generator=gen)
        lab = torch.full((ln,), X)
        if ns:
            lab[ln - 1 - ns:ln - 1] = tok[ln - ns:]
        ids.append(tok)
        labels.append(lab)
        sids.append(torch.full((ln,), i))
        d.append(torch.full((ln,), [1.0, 0.5, 2.0][i % 3]))
    cat = lambda xs: torch.cat(xs)[None]  # noqa: E731
    return {"input_ids": cat(ids), "labels": cat(labels), "sample_ids": cat(sids),
            "loss_weight": cat(d)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_deepspeed_scaling_algebra(reduction):
    """2 ranks x uneven micro-batches: sum over micro-batches of grad(S/W*P), averaged over ranks
    (what DeepSpeed does with scale_wrt_gas=False) equals the full-batch grad of L."""
    gen = torch.Generator().manual_seed(1)
    vocab, dim, world = 50, 6, 2
    torch.manual_seed(1)
    model = nn.ModuleDict({"emb": nn.Embedding(vocab, dim), "body": nn.Linear(dim, dim),
                           "head": nn.Linear(dim, vocab)})
    ranks = [
        [_random_mb(gen, [9, 4], [5, 2], vocab), _random_mb(gen, [3], [1], vocab)],
        [_random_mb(gen, [12, 6, 7], [8, 0, 3], vocab), _random_mb(gen, [5, 5], [0, 0], vocab),
         _random_mb(gen, [20], [15], vocab)],
    ]

    def s_mb(mb):
        hidden = torch.tanh(model["body"](model["emb"](mb["input_ids"])))
        return micro_batch_sum(hidden, model["head"], mb, reduction, chunk_size=4)

    params = list(model.parameters())
    all_mbs = [mb for r in ranks for mb in r]
    loss = sum(s_mb(mb) for mb in all_mbs) / local_weight_sum(all_mbs, reduction)
    full = torch.autograd.grad(loss, params)

    w_global = sum(local_weight_sum(r, reduction) for r in ranks)  # the all-reduce
    per_rank, logged = [], 0.0
    for mbs in ranks:
        model.zero_grad(set_to_none=True)
        for mb in mbs:
            s = s_mb(mb)
            scaled_loss(s, w_global, world).backward()
            logged = logged + s.detach()
        per_rank.append([p.grad.clone() for p in params])
    averaged = [sum(g) / world for g in zip(*per_rank)]
    for a, f in zip(averaged, full):
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logged / w_global, loss.detach())


# --- packed vs unpacked on a tiny InternVL ---------------------------------------------------

IMG = 5


@pytest.fixture(scope="module")
def tiny_internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=[28, 28], patch_size=[7, 7]),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         vocab_size=300, use_cache=False),
        image_token_id=IMG, image_seq_length=4, downsample_ratio=0.5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg).eval()  # eval: no dropout; grads still flow
    return model


def _samples(vocab=300):
    gen = torch.Generator().manual_seed(3)
    out = []
    for ln, n_sup, d, image in [(10, 4, 1.0, True), (6, 5, 0.5, False), (9, 2, 2.0, False)]:
        ids = torch.randint(10, vocab, (ln,), generator=gen)
        if image:
            ids[1:5] = IMG
        labels = torch.full((ln,), X)
        labels[ln - 1 - n_sup:ln - 1] = ids[ln - n_sup:]
        pv = torch.randn(1, 3, 28, 28, generator=gen) if image else None
        out.append((ids, labels, d, pv))
    return out


def _loss_and_grads(model, rows, reduction):
    """L over rows (each: input_ids, labels, sample_ids, loss_weight, position_ids,
    pixel_values) and its gradient for every parameter."""
    model.zero_grad(set_to_none=True)
    total_s, total_w = 0.0, 0.0
    for b in rows:
        out = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                          pixel_values=b["pixel_values"], use_cache=False)
        total_s = total_s + micro_batch_sum(out.last_hidden_state, model.lm_head, b, reduction,
                                            chunk_size=3)
        total_w = total_w + local_weight_sum([b], reduction)
    loss = total_s / total_w
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_equals_unpacked_internvl(tiny_internvl, reduction):
    model = tiny_internvl
    samples = _samples()
    single = []
    for ids, labels, d, pv in samples:
        n = len(ids)
        single.append({"input_ids": ids[None], "labels": labels[None],
                       "sample_ids": torch.zeros(1, n, dtype=torch.long),
                       "loss_weight": torch.full((1, n), d), "position_ids": torch.arange(n)[None],
                       "pixel_values": pv})
    pad = 2
    packed = {
        "input_ids": torch.cat([s[0] for s in samples] + [torch.zeros(pad, dtype=torch.long)])[None],
        "labels": torch.cat([s[1] for s in samples] + [torch.full((pad,), X)])[None],
        "sample_ids": torch.cat([torch.full((len(s[0]),), i) for i, s in enumerate(samples)]
                                + [torch.full((pad,), -1)])[None],
        "loss_weight": torch.cat([torch.full((len(s[0]),), s[2]) for s in samples]
                                 + [torch.zeros(pad)])[None],
        "position_ids": torch.cat([torch.arange(len(s[0])) for s in samples]
                                  + [torch.arange(pad)])[None],
        "pixel_values": torch.cat([s[3] for s in samples if s[3] is not None]),
    }
    loss_u, grads_u = _loss_and_grads(model, single, reduction)
    loss_p, grads_p = _loss_and_grads(model, [packed], reduction)

    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0)
    assert all(g is not None for g in grads_u.values())
    scale = max(g.abs().max() for g in grads_u.values())
    worst = max(((grads_p[n] - g).abs().max() / scale).item() for n, g in grads_u.items())
    assert worst < 1e-5, f"packed vs unpacked gradient differs by {worst:.2e} (relative to max)"

    # Control: position ids that do not restart let the samples attend to each other.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    _, grads_l = _loss_and_grads(model, [leaky], reduction)
    assert max(((grads_l[n] - g).abs().max() / scale).item() for n, g in grads_u.items()) > 1e-3
