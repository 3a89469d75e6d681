"""LoRA with real DeepSpeed on gloo (slow): the normalization stays exact, checkpoints are small
and resume exactly.

- ``vlmft train`` for 3 steps with LoRA on the language model and the projector trained fully
  (lora.modules_to_save), as 1 rank x 4 accumulation (ZeRO-2) and 2 ranks x 2 (ZeRO-3), with a
  text-only micro-batch on one rank while the other has images: the same adapter weights
  (<= 1e-5 relative) and the same losses (tests/dist_worker.py task e2e, as
  tests/test_families_dist.py runs it for other families).
- One optimizer step per reduction x ZeRO 2, 3 x split: the update of every trained parameter
  equals the plain-torch gradient of L on the same wrapped model (task lora_grad); no frozen
  weight moves.
- A run killed with SIGKILL after step 7 and continued with ``--resume auto`` logs the
  uninterrupted run's losses (<= 1e-6) and ends with its adapters (ZeRO-3); a ZeRO-2 checkpoint
  continued on 1 rank x 4 from the 2-rank checkpoint gives its losses (<= 1e-5). The
  checkpoints hold the trained parameters and their optimizer state only: at least 20x smaller
  than a full-parameter checkpoint of the same run. The recipe there puts adapters on q_proj and
  v_proj (r = 8): the demo's layers are 64 wide, so an adapter of rank r has r(in+out) = r/4 of
  a 64 x 64 layer's parameters (at 3584 wide, Qwen2.5-VL-7B, it would be r/1792); all seven
  projections at r = 8 give 10x here (benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest

from vlmft.data.catalog import build_catalog
from vlmft.data.stream import PackPlan
from vlmft.model import load_processor
from vlmft.recipe import load

from .conftest import BIN, DEMO, ROOT, clean_env, run, torchrun
from .test_checkpoint import ARGS, _losses, _start, _wait_for_step

pytestmark = pytest.mark.slow
TOL = 1e-5
WORKER = ROOT / "tests" / "dist_worker.py"
E2E = ["lora.enabled=true", "lora.modules_to_save=[projector]"]
SMALL = ["lora.enabled=true", "lora.targets.language=[q_proj,v_proj]"]


def _launch(out, nproc: int, tasks: str, extra: list[str]) -> dict:
    p = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), tasks,
             str(out), *extra], timeout=420, env=clean_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora-dist")
    return {1: _launch(base / "w1", 1, "e2e,lora_grad", E2E + ["engine.zero_stage=2"]),
            2: _launch(base / "w2", 2, "e2e,lora_grad", E2E + ["engine.zero_stage=3"])}


def _text_only_on_one_rank() -> list[int]:
    """Steps (of the first 3, 2 ranks x 2) where one rank's micro-batch has no image and the
    other's has: the blank vision input runs beside the projector's trained copy."""
    r = load(DEMO, ["train.grad_accum_steps=2", "train.max_steps=3", "output_dir=unused"])
    cat = build_catalog(r, load_processor(r.model), workers=1)
    plan, steps = PackPlan(r, cat), []
    for k in range(3):
        has = [[any(cat.samples[i].tiles for p in mb for i in p) for mb in plan.rank_step(k, rank, 2)]
               for rank in range(2)]
        if any(has[0][m] != has[1][m] for m in range(2)):
            steps.append(k)
    return steps


def test_lora_one_rank_x4_zero2_equals_two_ranks_x2_zero3(launches, in_root):
    import torch
    from safetensors.torch import load_file

    assert _text_only_on_one_rank(), "the data no longer has a text-only micro-batch beside images"
    runs = {w: launches[w]["e2e"] for w in (1, 2)}
    assert (runs[1]["acc"], runs[2]["acc"]) == (4, 2)
    metrics = [[json.loads(x) for x in open(f"{runs[w]['output_dir']}/metrics.jsonl")] for w in (1, 2)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == [1, 2, 3]
    for a, b in zip(*metrics):
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])
        assert math.isclose(a["loss"], b["loss"], rel_tol=TOL), (a["loss"], b["loss"])
    w1, w2 = (load_file(f"{runs[w]['output_dir']}/adapter/adapter_model.safetensors") for w in (1, 2))
    assert w1.keys() == w2.keys()
    assert sum(".lora_B." in k for k in w1) == 14 and sum(".multi_modal_projector." in k for k in w1) == 4
    num = sum(float((w1[k] - w2[k]).double().norm() ** 2) for k in w1)
    den = sum(float(w1[k].double().norm() ** 2) for k in w1)
    print(f"adapters + projector copy, 1x4 ZeRO-2 vs 2x2 ZeRO-3: {math.sqrt(num / den):.2e} relative")
    assert math.sqrt(num / den) <= TOL
    worst = max(float((w1[k] - w2[k]).abs().max() / w1[k].abs().max()) for k in w1 if w1[k].abs().max() > 0)
    assert worst <= TOL, worst
    # and the updates themselves, where the start is known: every B started at 0, the projector
    # copy at the demo's projector (A starts at random values, the same in both runs)
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(ROOT / "demo" / "model")).state_dict()
    w0 = {k: (torch.zeros_like(v) if ".lora_B." in k else base[k.removeprefix("base_model.model.")])
          for k, v in w1.items() if ".lora_B." in k or ".multi_modal_projector." in k}
    num = sum(float((w1[k] - w2[k]).double().norm() ** 2) for k in w0)
    den = sum(float((w1[k] - w0[k]).double().norm() ** 2) for k in w0)
    print(f"updates of B and the projector copy: {math.sqrt(num / den):.2e} relative")
    assert den > 0 and math.sqrt(num / den) <= TOL
    assert all(float(w1[k].abs().max()) > 0 for k in w1 if ".lora_B." in k)
    assert not any(torch.isnan(w).any() for w in w1.values())


@pytest.mark.parametrize("world", [1, 2])
def test_lora_step_gradient_is_the_gradient_of_L(launches, world):
    cases = launches[world]["lora_grad"]["cases"]
    assert len(cases) == 2 * 2 * 3  # ZeRO 2, 3 x two splits x three reductions
    print(json.dumps([{k: c[k] for k in ("stage", "acc", "reduction", "rel_global", "rel_worst_tensor")}
                      for c in cases]))
    for c in cases:  # rank 0's view (it holds the reference)
        assert not c["skipped"] and c["frozen_moved"] == [], c
        assert c["rel_global"] <= TOL and c["rel_worst_tensor"] <= TOL, c
        assert math.isclose(c["loss"], c["ref_loss"], rel_tol=TOL), c
    assert launches[world]["lora_grad"]["trained"] == 28 + 4  # 14 adapters x (A, B) + the projector copy (2 Linear)


# ------------------------------------------------------------------------------------------ resume


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def full_checkpoint_size(tmp_path_factory):
    out = tmp_path_factory.mktemp("full-size")
    p = torchrun(2, "train", str(DEMO), f"output_dir={out}", "train.max_steps=4", "checkpoint.every_steps=3")
    assert p.returncode == 0, p.stderr[-3000:]
    return _size(out / "checkpoints" / "step3")


def _reference(tmp_path, extra):
    ref = tmp_path / "reference"
    p = torchrun(2, "train", str(DEMO), f"output_dir={ref}", *ARGS, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    return ref


def _small_checkpoint(folder, stage, full_checkpoint_size):
    small = _size(folder)
    print(f"ZeRO-{stage}: LoRA checkpoint {small:,} bytes, full-parameter {full_checkpoint_size:,} "
          f"({full_checkpoint_size / small:.1f}x)")
    assert small * 20 <= full_checkpoint_size, (small, full_checkpoint_size)


def test_lora_sigkill_then_resume_auto_is_exact_and_the_checkpoint_small(tmp_path, full_checkpoint_size):
    """ZeRO-3, 2 ranks: killed after step 7, continued from step 6 (ZeRO-2 goes through the same
    adapter-only checkpoint and is resumed onto 1 rank below)."""
    extra = [*SMALL, "engine.zero_stage=3"]
    ref = _reference(tmp_path, extra)
    out = tmp_path / "run"
    proc = _start(out, *extra)
    _wait_for_step(out, 7, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    _small_checkpoint(out / "checkpoints" / "step6", 3, full_checkpoint_size)
    r = torchrun(2, "train", str(DEMO), f"output_dir={out}", *ARGS, *extra, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = _losses(out), _losses(ref)
    assert sorted(got) == list(range(1, 13))
    assert max(abs(got[s] - want[s]) for s in range(7, 13)) <= 1e-6
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys() and len(a) == 8  # q_proj, v_proj of 2 layers x (A, B)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_lora_zero2_checkpoint_continues_on_one_rank_x4(tmp_path, full_checkpoint_size):
    """A 2-rank ZeRO-2 checkpoint, small, continued on 1 rank x 4: the adapters' shards through
    DeepSpeed's universal format give the uninterrupted run's losses."""
    extra = [*SMALL, "engine.zero_stage=2"]
    ref = _reference(tmp_path, extra)
    _small_checkpoint(ref / "checkpoints" / "step6", 2, full_checkpoint_size)
    one = tmp_path / "one-rank"
    shutil.copytree(ref / "checkpoints" / "step6", one / "checkpoints" / "step6")
    r = run([str(BIN / "vlmft"), "train", str(DEMO), f"output_dir={one}", *ARGS, *extra,
             "train.grad_accum_steps=4", "--resume", str(one / "checkpoints" / "step6")])
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = _losses(one), _losses(ref)
    assert sorted(got) == list(range(7, 13))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-5  # the bar of tests/test_checkpoint.py
