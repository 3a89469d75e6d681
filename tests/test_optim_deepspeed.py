"""Issue 6 through real DeepSpeed (2 gloo ranks): the groups it steps are lr-table's, freezing holds.

The numbers come from the 2-rank launch of ``tests/dist_worker.py`` (task ``optim``) that
tests/test_distributed_grad.py also reads: one launch for both modules.

- Groups: with layer-wise decay on both towers (0.8 vision, 0.9 language), LR multipliers by glob
  (projector x10, layer scales x0.5), a ``no_decay`` glob and a 2-step warmup, after
  ``deepspeed.initialize`` with ZeRO 1, 2 and 3 the optimizer's groups (tests/optim_reference.py,
  members from DeepSpeed's own bookkeeping: ``bit16_groups`` for ZeRO 1/2, ``fp16_groups`` +
  ``sub_group_to_group_id`` for ZeRO 3) equal ``lr_table`` (built on the meta device, as the CLI
  does) row by row: name, lr, lr_scale, weight decay, member names and sizes; at step 0 and, after
  one real training step, at step 1.
- Freezing: each ``optim.freeze`` flag on its own engine (stages rotate): the parameters with
  ``requires_grad`` False are exactly the expected names, and after one training step through
  DeepSpeed (images on both ranks, so every tower gets a gradient) exactly those are
  bit-identical, every other weight has moved.
"""

from __future__ import annotations

import math

import pytest

from .test_distributed_grad import dist_results

FREEZE = ["vision=true", "projector=true", "language=true", "lm_head=true",
          "vision_first_layers=1", "vision_last_layers=1"]


@pytest.fixture(scope="module")
def optim_results(tmp_path_factory):
    return dist_results(tmp_path_factory)[2]["optim"]


@pytest.mark.slow
@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])
def test_deepspeed_groups_match_lr_table_row_by_row(optim_results, stage, step):
    [g] = [g for g in optim_results["groups"] if g["stage"] == stage]
    assert g["skipped"] is False
    ds_rows, table = g[f"ds_step{step}"], g[f"table_step{step}"]
    assert len(table) > 10  # layer decay x multipliers x decay/no-decay: many distinct groups
    assert len(ds_rows) == len(table)
    members = set()
    for got, want in zip(ds_rows, table):
        assert got["name"] == want["name"]
        assert math.isclose(got["lr"], want["lr"], rel_tol=1e-12), (got["name"], got["lr"], want["lr"])
        assert got["lr_scale"] == pytest.approx(want["lr_scale"], rel=1e-12)
        assert got["weight_decay"] == want["weight_decay"]
        assert got["members"] == want["members"]
        assert got["member_numel"] == want["numel"]
        if got["numel"] is not None:  # ZeRO 1/2: describe_groups counts it too
            assert got["numel"] == want["numel"]
        assert not members & set(got["members"])  # each parameter in one group only
        members |= set(got["members"])
        if want["weight_decay"] > 0:  # no norm, bias or layer scale is ever decayed
            assert not [n for n in want["members"]
                        if n.endswith(".bias") or "norm" in n or "lambda_" in n]


@pytest.mark.slow
@pytest.mark.parametrize("flag", FREEZE)
def test_freeze_flag_holds_through_a_deepspeed_step(optim_results, flag):
    [c] = [c for c in optim_results["freeze"] if c["override"] == f"optim.freeze.{flag}"]
    assert c["skipped"] is False
    expected = set(c["expected_frozen"])
    assert expected and expected != set(c["all"])
    assert set(c["planned_frozen"]) == expected
    assert set(c["requires_grad_false"]) == expected
    # after a real step: frozen weights bit-identical, every other weight moved, but those the
    # forward never uses (no gradient in plain torch: the demo's CLIP post_layernorm, since
    # LLaVA-NeXT takes the last hidden states before it)
    dead = set(optim_results["dead"])
    assert dead <= {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert set(c["unchanged"]) == expected | dead, {
        "frozen but changed": sorted(expected - set(c["unchanged"])),
        "trainable but unchanged": sorted(set(c["unchanged"]) - expected - dead)}
