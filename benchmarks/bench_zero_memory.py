"""Optimizer state per rank under ZeRO 1, 2 and 3: 1 rank against 2 ranks (gloo, CPU).

    python benchmarks/bench_zero_memory.py            # launches torchrun itself, prints a table

Each worker builds the demo model with vlmft's parameter groups and DeepSpeed engine
(engine.initialize, as `vlmft train` does), takes one optimizer step so that AdamW's state
exists, and reads from DeepSpeed's own partitions how many fp32 master elements and AdamW state
elements this rank holds. With 2 ranks each should hold half (DeepSpeed pads partitions to
alignment, so "within 1%").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(stage: int, out: str) -> None:
    import torch

    from vlmft import engine as ds
    from vlmft.distributed import init as _init_distributed
    from vlmft.distributed import setup_environment
    from vlmft import optim, schedule
    from vlmft.forward import LossModule
    from vlmft.model import load_model, load_processor
    from vlmft.models import family_of
    from vlmft.recipe import load

    setup_environment()
    rank, world = _init_distributed()
    recipe = load(ROOT / "recipes" / "demo.yaml", [f"engine.zero_stage={stage}"])
    model = load_model(recipe.model)
    opt, _ = optim.build_optimizer(model, recipe.optim)
    sched = schedule.scheduler(opt, recipe.schedule, recipe.train.max_steps)
    processor = load_processor(recipe.model)
    fam = family_of(processor)
    eng = ds.initialize(LossModule(model, fam, 1024, blank=fam.blank(processor) if world > 1 else None),
                        opt, sched, recipe, world)
    ids = torch.randint(20, 300, (1, 16))
    inputs = {"model": {"input_ids": ids, "position_ids": torch.arange(16)[None]}, "labels": ids,
              "sample_ids": torch.zeros_like(ids), "tokens": None}
    for _ in range(recipe.train.grad_accum_steps):
        ds.backward(eng, eng(inputs, torch.ones(1, 16)))
        eng.step()
    o = eng.optimizer
    if stage == 3:
        master = sum(t.numel() for t in o.fp32_partitioned_groups_flat)
    else:
        master = sum(t.numel() for t in o.single_partition_of_fp32_groups)
    state = sum(v.numel() for s in o.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    row = {"stage": stage, "world": world, "rank": rank, "master_fp32": master, "adam_state": state,
           "bytes": 4 * (master + state)}
    Path(out, f"s{stage}_w{world}_r{rank}.json").write_text(json.dumps(row))


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (1, 2, 3):
            for world in (1, 2):
                subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                                "--nproc_per_node", str(world), __file__, "--worker", str(stage), tmp],
                               cwd=ROOT, env=env, check=True, capture_output=True)
        for f in sorted(Path(tmp).glob("*.json")):
            rows.append(json.loads(f.read_text()))
    print("| ZeRO | 1 rank: fp32 master + Adam state (elements) | 2 ranks: per rank (max) | ratio |")
    print("|---|---|---|---|")
    for stage in (1, 2, 3):
        one = [r for r in rows if r["stage"] == stage and r["world"] == 1][0]
        two = max(r["master_fp32"] + r["adam_state"] for r in rows if r["stage"] == stage and r["world"] == 2)
        total = one["master_fp32"] + one["adam_state"]
        print(f"| {stage} | {total:,} | {two:,} | {two / total:.4f} |")
    if "--json" in sys.argv:
        print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
