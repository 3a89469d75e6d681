"""CPU threads per rank: a 2-rank `vlmft train` of the demo with torch's default thread count
against one with vlmft's choice (the CPUs available / ranks on the machine, vlmft/runtime.py).

Both runs go through the CLI under ``torchrun --nproc_per_node 2``. torchrun itself sets
OMP_NUM_THREADS=1 when it is unset; the variants set it explicitly instead:

- ``torch default``: OMP_NUM_THREADS = the CPUs available (what torch takes in a process that
  is told nothing, e.g. under the deepspeed launcher or a hand-written launch script), which
  vlmft leaves as it is (an explicit setting wins);
- ``vlmft``: OMP_NUM_THREADS set but empty, so neither torchrun nor torch decides and vlmft's
  set-up gives each rank CPUs / 2 threads.

Figure: the median ``step_time_s`` of metrics.jsonl over the steps after the first five.

    .venv/bin/python benchmarks/bench_threads.py [--steps 30] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DIST = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run(omp: str, steps: int, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST}
    env["OMP_NUM_THREADS"] = omp
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "vlmft",
                        "train", "recipes/demo.yaml", f"output_dir={out}", f"train.max_steps={steps}",
                        "--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[5:]]
    return {"omp_num_threads": omp or "(empty: vlmft decides)", "median_step_s": statistics.median(times),
            "mean_step_s": statistics.mean(times), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="alternate the two variants this many times")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    runs = {"torch default": [], "vlmft": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):   # alternated, so a load that comes and goes hits both
            runs["torch default"].append(run(str(cpus), args.steps, Path(tmp) / "a"))
            runs["vlmft"].append(run("", args.steps, Path(tmp) / "b"))
    res = {"cpus": cpus, "steps": args.steps, "runs": runs,
           "ratios": [a["median_step_s"] / b["median_step_s"] for a, b in zip(runs["torch default"], runs["vlmft"])]}
    if args.json:
        print(json.dumps(res))
        return
    print(f"{cpus} CPUs, 2 ranks, demo recipe, {args.steps} steps, {args.repeat} alternations")
    for k, vs in runs.items():
        print(f"{k:14s} OMP_NUM_THREADS={vs[0]['omp_num_threads']:>24s}  median step "
              + " / ".join(f"{v['median_step_s']:.3f}" for v in vs) + " s")
    print("ratio (default / vlmft): " + " / ".join(f"{r:.2f}" for r in res["ratios"]))


if __name__ == "__main__":
    main()
