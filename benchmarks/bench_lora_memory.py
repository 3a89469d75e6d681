"""Optimizer state and peak memory per rank: LoRA against full fine-tuning, 2 ranks (gloo, CPU).

    python benchmarks/bench_lora_memory.py            # launches torchrun itself, prints a table

The model is the demo model's layout (demo/model) with a wider, deeper language model
(hidden 768, 12 layers, MLP 3072: about 100M parameters, built from a config with random
weights in a temporary folder, with the demo's processor). Each worker builds it as ``vlmft train`` does (lora.resolve
on the meta model, load, lora.apply, vlmft's parameter groups, vlmft.engine.initialize), takes
three optimizer steps on 512-token rows, and reports from DeepSpeed's own partitions the fp32
master and AdamW state elements this rank holds, and the process's peak resident memory
(ru_maxrss: loading included, as a user sees it). LoRA: the recipe's defaults (r = 8 on every
nn.Linear of the language model). ZeRO 2 and 3, 2 ranks each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "model"
TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 4, "layer_types": ["full_attention"] * 12}
STEPS, LENGTH = 3, 512


def make_model(folder: Path) -> int:
    """The ~100M-parameter model folder; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(DEMO))
    for k, v in TEXT.items():
        setattr(config.text_config, k, v)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(str(folder))
    for f in DEMO.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, folder / f.name)
    return sum(p.numel() for p in model.parameters())


def worker(folder: str, mode: str, stage: int, out: str) -> None:
    import resource

    import torch

    from vlmft import engine as ds
    from vlmft import lora, optim, schedule
    from vlmft.distributed import init as _init_distributed
    from vlmft.distributed import setup_environment
    from vlmft.forward import LossModule
    from vlmft.model import load_model, load_processor
    from vlmft.models import family_of
    from vlmft.recipe import load

    setup_environment()
    rank, world = _init_distributed()
    recipe = load(ROOT / "recipes" / "demo.yaml", [f"model.name_or_path={folder}", f"engine.zero_stage={stage}",
                                                     "train.grad_accum_steps=1", "output_dir=unused"]
                  + (["lora.enabled=true"] if mode == "lora" else []))
    targets = lora.resolve_before_load(recipe.model, recipe.lora)
    model = lora.apply(load_model(recipe.model), recipe.lora, targets)
    opt, rows = optim.build_optimizer(model, recipe.optim)
    sched = schedule.scheduler(opt, recipe.schedule, recipe.train.max_steps)
    processor = load_processor(recipe.model)
    fam = family_of(processor)
    eng = ds.initialize(LossModule(model, fam, 1024, blank=fam.blank(processor) if world > 1 else None),
                        opt, sched, recipe, world)
    torch.manual_seed(rank)
    for _ in range(STEPS):
        ids = torch.randint(20, 300, (1, LENGTH))
        inputs = {"model": {"input_ids": ids, "position_ids": torch.arange(LENGTH)[None]}, "labels": ids,
                  "sample_ids": torch.zeros_like(ids), "tokens": None}
        ds.backward(eng, eng(inputs, torch.ones(1, LENGTH)))
        eng.step()
    o = eng.optimizer
    master = sum(t.numel() for t in (o.fp32_partitioned_groups_flat if stage == 3 else o.single_partition_of_fp32_groups))
    state = sum(v.numel() for s in o.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    row = {"mode": mode, "stage": stage, "rank": rank, "world": world,
           "trainable": sum(r.numel for r in rows if not r.frozen), "total": sum(r.numel for r in rows),
           "master_fp32": master, "adam_state": state, "optimizer_bytes": 4 * (master + state),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(out, f"{mode}_s{stage}_r{rank}.json").write_text(json.dumps(row))


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n = make_model(folder)
        for stage in (2, 3):
            for mode in ("full", "lora"):
                p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                                    "2", __file__, "--worker", str(folder), mode, str(stage), tmp],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(p.stderr[-3000:])
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    mb = 2 ** 20
    print(f"model: {n:,} parameters; 2 ranks; {STEPS} steps of {LENGTH} tokens")
    print("| ZeRO | mode | trainable | optimizer state per rank (max) | peak RSS per rank (max) |")
    print("|---|---|---|---|---|")
    for stage in (2, 3):
        for mode in ("full", "lora"):
            rs = [r for r in rows if (r["mode"], r["stage"]) == (mode, stage)]
            opt = max(r["optimizer_bytes"] for r in rs)
            peak = max(r["peak_rss_bytes"] for r in rs)
            print(f"| {stage} | {mode} | {rs[0]['trainable']:,} | {opt / mb:,.1f} MiB | {peak / mb:,.0f} MiB |")
        full, lo = ([r for r in rows if (r["mode"], r["stage"]) == (m, stage)] for m in ("full", "lora"))
        print(f"| {stage} | full / lora | | {max(r['optimizer_bytes'] for r in full) / max(r['optimizer_bytes'] for r in lo):.1f}x"
              f" | {max(r['peak_rss_bytes'] for r in full) / max(r['peak_rss_bytes'] for r in lo):.2f}x |")
    if "--json" in sys.argv:
        print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
