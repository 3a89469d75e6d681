"""One run per output_dir (refused, --resume, --overwrite), what --resume auto will do, and
the threads each rank gets."""

from __future__ import annotations

import os

from vlmft import run_dir, runtime



def test_refusal_only_for_a_folder_that_holds_something(tmp_path):
    out = tmp_path / "run"
    assert run_dir.refusal(str(out), None, False) is None            # not there
    out.mkdir()
    assert run_dir.refusal(str(out), None, False) is None            # empty
    (out / "notes.txt").write_text("x")
    assert "already holds a run (notes.txt)" in run_dir.refusal(str(out), None, False)
    assert run_dir.refusal(str(out), "auto", False) is None
    assert run_dir.refusal(str(out), None, True) is None
    assert "give one of them" in run_dir.refusal(str(out), "auto", True)


def test_clear_removes_only_what_a_run_writes(tmp_path):
    for d in ("checkpoints/step4", "final", "tb", "mine"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "recipe.yaml", "notes.txt"):
        (tmp_path / f).write_text("x")
    assert run_dir.clear(str(tmp_path)) == ["checkpoints", "final", "metrics.jsonl", "recipe.yaml", "tb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_resume_auto_says_where_it_resumes_or_that_it_starts_fresh(tmp_path):
    from vlmft.checkpoint import COMPLETE

    assert run_dir.resume_note(str(tmp_path), None) is None
    assert run_dir.resume_note(str(tmp_path), "auto") == (
        f"vlmft: --resume auto: no complete checkpoint in {tmp_path / 'checkpoints'}; starting fresh at step 1")
    for tag, done in (("step2", True), ("step4", True), ("step6", False)):
        (tmp_path / "checkpoints" / tag).mkdir(parents=True)
        if done:
            (tmp_path / "checkpoints" / tag / COMPLETE).write_text(tag)
    assert run_dir.resume_note(str(tmp_path), "auto") == (
        f"vlmft: --resume auto: resuming from {tmp_path / 'checkpoints' / 'step4'}")


def test_threads_per_rank_share_the_cpus_available(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for local, want in ((None, 8), ("4", 2), ("16", 1)):
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert runtime.threads_per_rank() == want
    monkeypatch.setenv("OMP_NUM_THREADS", "3")                       # an explicit choice stands
    assert runtime.threads_per_rank() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
