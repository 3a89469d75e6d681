"""benchmarks/bench_gpu.py in its small CPU mode (shapes shrunk, no figures recorded), so the GPU
benchmark cannot rot: every CPU kernel trains packed and padded, and the bf16 isolation check
passes while its control (positions running on over the row) fails."""

from __future__ import annotations

import json
import sys

from .conftest import ROOT, clean_env, run


def test_bench_gpu_small_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    p = run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--small", "--steps", "1",
             "--json", str(out)], timeout=300, env=clean_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "small mode" in p.stdout
    res = json.loads(out.read_text())
    assert res["shape"] == "small" and [r["kernel"] for r in res["results"]] == ["sdpa", "eager"]
    for r in res["results"]:
        assert r["samples"] >= 4 and r["tokens"] <= 256
        iso = r["isolation"]
        assert iso["packed_vs_alone"] <= iso["tolerance"] < iso["control_leak"], iso
        for mode in ("packed", "padded"):
            m = r[mode]
            assert m["step_s"] > 0 and m["tokens_per_s"] > m["supervised_tokens_per_s"] > 0
            assert m["mfu"] is None and m["peak_memory_gb"] is None   # no figures on a CPU
