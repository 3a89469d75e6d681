"""The host side of a step: DataLoader workers per rank for ``data.num_workers: auto``, pinned
tensors copied without blocking, and the head's positions found on the host (no device-side
``nonzero`` in the loss)."""

from __future__ import annotations

import pytest
import torch

from vlmft import loss as lossmod
from vlmft.data.loader import StepLoader, workers_per_rank
from vlmft.forward import to_device
from vlmft.recipe import RecipeError, load

from .conftest import DEMO


def test_auto_workers_per_rank():
    assert workers_per_rank("auto", cuda=False, cpus=64, ranks=8) == 0    # the step computes on the CPUs
    assert workers_per_rank("auto", cuda=True, cpus=16, ranks=2) == 7     # 8 CPUs a rank, one for the rank
    assert workers_per_rank("auto", cuda=True, cpus=192, ranks=8) == 8    # at most 8
    assert workers_per_rank("auto", cuda=True, cpus=8, ranks=8) == 0
    assert workers_per_rank(3, cuda=False) == 3                           # a number is taken as it is


def test_num_workers_setting(in_root, processor):
    from vlmft.data.catalog import build_catalog

    r = load(DEMO, ["train.max_steps=2"])
    assert r.data.num_workers == "auto"
    cat = build_catalog(r, processor, limit=40)
    assert StepLoader(r, cat, processor, 0, 1).workers == (workers_per_rank("auto"))
    assert StepLoader(load(DEMO, ["data.num_workers=2"]), cat, processor, 0, 1).workers == 2
    for bad, msg in (("many", "data.num_workers: expected a number of workers or auto, got 'many'"),
                     ("-1", "data.num_workers: must be >= 0, got -1"),
                     ("1.5", "data.num_workers: expected int or str, got 1.5")):
        with pytest.raises(RecipeError) as err:
            load(DEMO, [f"data.num_workers={bad}"])
        assert any(msg in e for e in err.value.errors), err.value.errors


class _Pinned(torch.Tensor):
    """A host tensor that says it is pinned (a CPU-only torch cannot pin) and records copies."""
    copies: list = []

    def is_pinned(self, *args):
        return True

    def to(self, *args, **kwargs):
        _Pinned.copies.append(kwargs.get("non_blocking"))
        return self.as_subclass(torch.Tensor).to(*args, **kwargs)


def test_pinned_tensors_are_copied_without_blocking():
    _Pinned.copies.clear()
    out = to_device({"a": torch.ones(2).as_subclass(_Pinned), "b": {"c": torch.ones(3)}, "n": None, "k": 4}, "cpu")
    assert _Pinned.copies == [True]
    assert out["n"] is None and out["k"] == 4 and out["b"]["c"].tolist() == [1.0, 1.0, 1.0]


def test_head_rows_from_the_host_give_the_same_sum_without_a_device_nonzero(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(1, 12, 8, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, -100, 5, 6, 7, -100, 1, 2, -100, 9]])
    weights = torch.where(labels != -100, torch.rand(1, 12), torch.zeros(1, 12))
    weights[0, 4] = 0.0   # a labelled position of weight 0 (loss_weight 0): in the rows, adds nothing
    want = lossmod.weighted_ce_sum(hidden, head, labels, weights, chunk_size=3)
    rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)

    def no_nonzero(*args, **kwargs):
        raise AssertionError("nonzero on the device")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_nonzero)
    got = lossmod.weighted_ce_sum(hidden, head, labels, weights, chunk_size=3, rows=rows, n_chunks=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
