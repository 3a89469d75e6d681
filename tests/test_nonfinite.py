"""The finite guard: a step whose gradient is not finite on any rank changes nothing anywhere,
is counted, and too many in a row stop the run with one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from .conftest import BIN, DEMO, ROOT, clean_env, run


def _metrics(folder):
    return [json.loads(x) for x in open(f"{folder}/metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_nan_on_one_rank_of_two_is_a_skipped_step(tmp_path, stage):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    p = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "dist_worker.py"),
             "nonfinite", str(out), f"engine.zero_stage={stage}"], timeout=300, env=clean_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())["nonfinite"]
    nan, empty = (_metrics(res["runs"][m]) for m in ("nan", "empty"))
    k = res["nan_step"]
    assert [r["nonfinite_steps"] for r in nan] == [0] + [1] * 3 and nan[k - 1]["loss"] is None
    assert [r["skipped_steps"] for r in nan] == [0] * 4           # counted apart from empty steps
    assert [r["skipped_steps"] for r in empty] == [0] + [1] * 3 and empty[-1]["nonfinite_steps"] == 0
    for a, b in zip(nan, empty):
        assert a["lr"] == b["lr"]                                  # the schedule moved on alike
    w_nan, w_empty = (load_file(f"{res['runs'][m]}/final/model.safetensors") for m in ("nan", "empty"))
    w0 = load_file(str(ROOT / "demo" / "model" / "model.safetensors"))
    assert all(torch.equal(w_nan[n], w_empty[n]) for n in w0)      # the same weights, bit for bit
    assert any(not torch.equal(w_nan[n], w0[n]) for n in w0)       # and training did move them
    assert all(torch.isfinite(w).all() for w in w_nan.values())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(in_root, tmp_path, monkeypatch):
    from vlmft import forward
    from vlmft.cli import app

    real = forward.hidden_states
    monkeypatch.setattr(forward, "hidden_states", lambda *a, **k: real(*a, **k) * float("nan"))
    r = CliRunner().invoke(app, ["train", str(DEMO), f"output_dir={tmp_path}", "train.max_steps=10",
                                 "train.max_nonfinite_steps=2", "checkpoint.every_steps=0"])
    assert r.exit_code == 2, r.output[-2000:]
    lines = [x for x in r.output.splitlines() if x.startswith("error")]
    assert lines == [lines[0]] and lines[0].startswith("error step 2: the gradient norm was not finite in 2 steps")
    assert not (tmp_path / "final").exists()
    assert [m["nonfinite_steps"] for m in _metrics(tmp_path)] == [1, 2]
