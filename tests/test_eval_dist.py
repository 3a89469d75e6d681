"""Evaluation on several ranks (torchrun, gloo, real DeepSpeed): the same eval loss on 1 and 2
ranks for every reduction, and a 2-rank ZeRO-3 training run that evaluates every 2 steps with
the ranks holding different numbers of eval samples and of questions (no hang), whose last
evaluation equals `vlmft eval` of the exported model on one process (and its step-2 one, of the
ZeRO-3 checkpoint)."""

from __future__ import annotations

import json

import pytest

from .conftest import BIN, DEMO, ROOT, run, torchrun, vlmft
from .test_eval import LINES

pytestmark = pytest.mark.slow


def split(tmp_path) -> list[str]:
    (tmp_path / "a.jsonl").write_text("\n".join(LINES[:25]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(LINES[25:]) + "\n")
    root = ROOT / "demo" / "data"
    return [f"data.eval=[{{path: '{tmp_path}/a.jsonl', image_root: '{root}'}}, "
            f"{{path: '{tmp_path}/b.jsonl', image_root: '{root}'}}]", f"output_dir={tmp_path}/run"]


def test_eval_loss_is_the_same_on_one_and_two_ranks_for_every_reduction(tmp_path, in_root, dist_env):
    from vlmft.eval import evaluate
    from vlmft.recipe import load

    extra = split(tmp_path)
    p = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "dist_worker.py"),
             "eval", str(tmp_path / "out"), *extra], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads((tmp_path / "out" / "results.json").read_text())["eval"]
    for reduction in ("token", "sample", "square"):
        one = evaluate(load(DEMO, [*extra, f"loss.reduction={reduction}", "train.micro_batch_size=2"]),
                       None, generate=False)
        got = two[reduction]
        assert sum(got["samples_per_rank"]) == 60 and len(got["samples_per_rank"]) == 2
        for name in ("a", "b"):
            for key in ("loss", "loss_blank_images", "visual_gap"):
                assert abs(got["datasets"][name][key] - one["datasets"][name][key]) <= 1e-6, (reduction, name, key)
            assert got["datasets"][name]["samples"] == one["datasets"][name]["samples"]
        assert abs(got["overall"]["loss"] - one["overall"]["loss"]) <= 1e-6


def test_zero3_training_evaluates_every_2_steps_with_uneven_ranks(tmp_path, in_root):
    out = tmp_path / "z3"
    p = torchrun(2, "train", str(DEMO), f"output_dir={out}", "train.max_steps=4", "engine.zero_stage=3",
                 "eval.every_steps=2", "eval.generate=true", "eval.max_new_tokens=4",
                 "eval.max_generate_samples=5", "checkpoint.every_steps=2", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    evals = [s for s, r in rows.items() if "eval/heldout/loss" in r]
    assert evals == [2, 4]
    per_rank = rows[4]["eval/samples_per_rank"]
    assert sum(per_rank) == 60 and per_rank[0] != per_rank[1], per_rank     # uneven on purpose
    assert rows[4]["eval/answers_per_rank"] == [3, 2]
    for step in (2, 4):
        preds = (out / "eval" / f"step{step}" / "heldout.jsonl").read_text().splitlines()
        assert len(preds) == 5 and all(json.loads(x)["prediction"] is not None for x in preds)
    # the last evaluation (ZeRO-3, 2 ranks, answers from gathered copies of the weights) is
    # `vlmft eval` of the exported model on one process
    q = vlmft("eval", str(DEMO), f"output_dir={out}", "eval.max_new_tokens=4", "eval.max_generate_samples=5",
              "--model", str(out / "final"), "--json")
    assert q.returncode == 0, q.stderr[-2000:]
    alone = json.loads(q.stdout)["datasets"]["heldout"]
    for key in ("loss", "loss_blank_images"):
        assert abs(alone[key] - rows[4][f"eval/heldout/{key}"]) <= 1e-5, key
    answers = [[json.loads(x)["prediction"] for x in (out / "eval" / d / "heldout.jsonl").read_text().splitlines()]
               for d in ("step4", "final")]
    assert answers[0] == answers[1]
    # and a ZeRO-3 checkpoint, evaluated on one process, gives the loss training measured there
    q = vlmft("eval", str(DEMO), f"output_dir={out}", "--model", str(out / "checkpoints" / "step2"),
              "--json", "--no-generate")
    assert q.returncode == 0, q.stderr[-2000:]
    assert abs(json.loads(q.stdout)["datasets"]["heldout"]["loss"] - rows[2]["eval/heldout/loss"]) <= 1e-5
