"""ZeRO memory per rank, 2 gloo ranks on the CPU (launches torchrun itself, prints tables).

    python benchmarks/bench_zero_memory.py            # optimizer state per rank, ZeRO 1/2/3
    python benchmarks/bench_zero_memory.py --host     # peak host memory of load + 2 steps

Optimizer state: each worker builds the demo model with vlmft's parameter groups and DeepSpeed
engine (engine.initialize, as `vlmft train` does), takes one optimizer step so that AdamW's
state exists, and reads from DeepSpeed's own partitions how many fp32 master elements and AdamW
state elements this rank holds. With 2 ranks each should hold half (DeepSpeed pads partitions
to alignment, so "within 1%").

Host memory (``--host``): a random model of about 300 M parameters (the demo's vision tower and
processor, a Qwen2 language tower of width 1024, 20 layers, vocabulary 32,000) saved as a bf16
folder, then ``vlmft.train.train`` under ZeRO-3 for 2 steps (bf16, 256-token rows), three ways:
``zero3_init`` (vlmft now: built partitioned, in bf16), ``bf16_full`` (the whole model built on
every rank in bf16, DeepSpeed partitions it at initialize) and ``fp32_full`` (the same in fp32,
vlmft before). Each rank samples its /proc/self/status every 5 ms: the peak of RssAnon (its own
memory: tensors, allocator) during the load (up to DeepSpeed's initialize) and over the run;
VmHWM, the kernel's peak RSS, also counts the checkpoint's memory-mapped file pages (shared,
reclaimable page cache).
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


HOST_VARIANTS = ("zero3_init", "bf16_full", "fp32_full")


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class _Sampler:
    """Peak RssAnon and VmRSS of this process, sampled every 5 ms on a thread."""

    def __init__(self):
        import threading

        self.anon = self.rss = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import time

        while not self.stop:
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.rss = max(self.rss, _status_kib("VmRSS"))
            time.sleep(0.005)

    def mark(self, phases: dict, name: str) -> None:
        phases[f"{name}_anon_kib"], phases[f"{name}_rss_kib"] = self.anon, self.rss


def host_worker(variant: str, model_dir: str, out: str) -> None:
    import contextlib
    import time

    sampler = _Sampler()
    t0 = time.perf_counter()
    from vlmft import engine as ds
    from vlmft import train as trainmod
    from vlmft.distributed import setup_environment
    from vlmft.recipe import load

    setup_environment()
    phases = {}
    real_init = ds.initialize

    def initialize(*args, **kwargs):   # the load ends where DeepSpeed's initialize begins
        sampler.mark(phases, "load")
        phases["load_s"] = time.perf_counter() - t0
        eng = real_init(*args, **kwargs)
        sampler.mark(phases, "engine")
        return eng

    ds.initialize = initialize
    if variant != "zero3_init":   # the whole model on every rank; DeepSpeed partitions it at initialize
        ds.zero3_init = lambda config: contextlib.nullcontext()
    precision = "fp32" if variant == "fp32_full" else "bf16"
    real_load = trainmod.load_model

    def load_model(cfg, _precision):   # fp32_full: cast to bf16 by DeepSpeed, as vlmft did before
        phases["base_kib"] = _status_kib("RssAnon")   # imports, data catalog: before any weight
        return real_load(cfg, precision)

    trainmod.load_model = load_model
    recipe = load(ROOT / "recipes" / "demo.yaml", [
        f"model.name_or_path={model_dir}", "engine.zero_stage=3", "engine.precision=bf16",
        "train.max_steps=2", "train.grad_accum_steps=1", f"output_dir={out}/run_{variant}",
        "checkpoint.every_steps=0", "data.packing.max_packed_tokens=256"])
    result = trainmod.train(recipe)
    sampler.stop = True
    sampler.mark(phases, "run")
    row = {"variant": variant, "rank": result.rank, "precision_loaded": precision, **phases,
           "vmhwm_kib": _status_kib("VmHWM"), "total_s": time.perf_counter() - t0}
    Path(out, f"host_{variant}_r{result.rank}.json").write_text(json.dumps(row))


def host_model(dest: Path) -> int:
    """The ~300 M-parameter random model folder (bf16); returns its parameter count."""
    import shutil

    import torch
    import transformers as tf

    demo = ROOT / "demo" / "model"
    cfg = tf.AutoConfig.from_pretrained(demo)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1024, 2816, 20
    t.num_attention_heads, t.num_key_value_heads, t.vocab_size = 16, 4, 32000
    t.layer_types = ["full_attention"] * 20
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    for f in demo.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, dest / f.name)
    return sum(p.numel() for p in model.parameters())


def host_main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        n = host_model(Path(tmp) / "model")
        for variant in HOST_VARIANTS:
            subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                            __file__, "--host-worker", variant, str(Path(tmp) / "model"), tmp],
                           cwd=ROOT, env=env, check=True, capture_output=True)
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("host_*.json"))]
    mib = lambda kib: f"{kib / 1024:,.0f}"  # noqa: E731
    print(f"model: {n / 1e6:.1f} M parameters ({2 * n / 2**20:,.0f} MiB in bf16, {4 * n / 2**20:,.0f} MiB in fp32)")
    print("peaks in MiB, RssAnon / VmRSS; 'before': RssAnon when the load starts (imports, data)")
    print("| variant | rank | before | load | + DeepSpeed initialize | + 2 steps | load s |")
    print("|---|---|---|---|---|---|---|")
    for v in HOST_VARIANTS:
        for r in sorted((r for r in rows if r["variant"] == v), key=lambda r: r["rank"]):
            cells = [f"{mib(r[p + '_anon_kib'])} / {mib(r[p + '_rss_kib'])}" for p in ("load", "engine", "run")]
            print(f"| {v} | {r['rank']} | {mib(r['base_kib'])} | " + " | ".join(cells) + f" | {r['load_s']:.1f} |")
    if "--json" in sys.argv:
        print(json.dumps(rows))


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
    elif len(sys.argv) > 1 and sys.argv[1] == "--host-worker":
        host_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    elif "--host" in sys.argv:
        host_main()
    else:
        main()
