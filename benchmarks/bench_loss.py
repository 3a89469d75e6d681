"""What exact loss normalization costs per optimizer step, against a plain per-micro-batch mean.

    .venv/bin/python benchmarks/bench_loss.py                       # 1 process
    .venv/bin/torchrun --standalone --nproc_per_node 2 benchmarks/bench_loss.py   # 2 gloo ranks
    ... bench_loss.py --steps 30 --json [key=value recipe overrides]

The demo recipe (recipes/demo.yaml: tiny InternVL, 256-token packs, loss.reduction square,
ZeRO-2, fp32), built as ``vlmft train`` builds it; the micro-batches of the first steps are
materialized up front, so data loading is not timed. Then, on the same engine, every step's
micro-batches go through both loss paths (A then B, B then A, ...):

  normalized  vlmft.train.train_step: per-token weights w(n_s) d(s), the step's global weight
              sum (one all-reduce of a few numbers per step, before the first backward), each
              micro-batch backpropagates S_mb / W * world with scale_wrt_gas=False; the logged L
              takes a second all-reduce per step (overlapping the optimizer step).
  plain mean  the same forward (chunked fp32 CE, loss.reduction token, no dataset weights), each
              micro-batch's loss divided by its own supervised-token count, engine.backward(loss)
              with DeepSpeed's own 1/grad_accum_steps; no all-reduce of ours.

Reported:
- step time of each path (median) and the median of the paired per-step differences, in wall
  time and in this process's CPU time (less inflated by other load on a shared machine); noisy
  all the same, since the forward and backward dominate;
- the normalization's own work timed directly, many times: the weights of every micro-batch,
  the counts tensor and its all-reduce, the S / W * world scaling and the all-reduce of the
  logged loss (waited for here, so counted in full), as a share of the normalized step time;
- collectives per step issued from vlmft code (torch.distributed calls whose caller is a vlmft
  module), and the others seen (DeepSpeed's gradient reductions, which both paths share; a lower
  bound, since DeepSpeed also reaches torch.distributed by other routes, e.g. ZeRO-3's gathers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the demo recipe names paths relative to the repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vlmft import engine as ds  # noqa: E402
from vlmft.distributed import all_reduce_sum, setup_environment  # noqa: E402
from vlmft.distributed import init as _init_distributed  # noqa: E402
from vlmft import loss as lossmod  # noqa: E402
from vlmft import optim, schedule  # noqa: E402
from vlmft.data.catalog import build_catalog  # noqa: E402
from vlmft.data.stream import Materializer, PackPlan  # noqa: E402
from vlmft.model import load_model, load_processor  # noqa: E402
from vlmft.recipe import load  # noqa: E402
from vlmft.forward import LossModule, model_inputs, to_device  # noqa: E402
from vlmft.models import family_of  # noqa: E402
from vlmft.train import step_counts, train_step  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "reduce", "barrier", "all_to_all_single")


class CollectiveCounter:
    """Counts torch.distributed collectives by caller: a vlmft module, or anything else."""

    def __init__(self):
        self.counts = {"vlmft": 0, "other": 0}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(fn))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            self.counts["vlmft" if caller.startswith("vlmft") else "other"] += 1
            return fn(*args, **kwargs)

        return counted

    def take(self) -> dict:
        out, self.counts = self.counts, {"vlmft": 0, "other": 0}
        return out


def plain_mean_step(eng, module, batches):
    """The baseline: a per-micro-batch token mean, DeepSpeed's own scaling, nothing global."""
    dev = eng.device
    for b in batches:
        inputs = to_device(model_inputs(module.family, module.model, b), dev)
        sup = (b["labels"] != lossmod.IGNORE_INDEX).float()
        n = max(1, int(sup.sum()))
        s = eng(inputs, sup.to(dev))
        eng.backward(s / n)
        eng.step()


def normalization_work(batches, recipe, world, dev) -> tuple[float, float]:
    """Seconds of the normalization's own work for one step, as train_step does it, as (local,
    all-reduces). Local: the weights of each micro-batch (computed once: summed for W and
    passed to the loss), the counts tensor, the S / W * world scaling. All-reduces: the counts
    (before the first backward) and the step's loss sum for the logged L (train_step overlaps
    that one with the optimizer step; here it is waited for, so counted in full). With several
    ranks their time includes waiting for the slower rank."""
    red = recipe.loss.reduction
    t = time.perf_counter()
    weights, counts = step_counts(batches, red, device=dev)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    counts = all_reduce_sum(counts)
    t_comm = time.perf_counter() - t
    t = time.perf_counter()
    W = counts[0].float()
    s_sum = torch.zeros((), device=dev)
    for w in weights:
        s = lossmod.scaled_loss(w.sum(), W, world)
        s_sum += s.detach()
    t_local += time.perf_counter() - t
    t = time.perf_counter()
    all_reduce_sum(s_sum) / W  # the logged loss: the second (and last) all-reduce of the step
    t_comm += time.perf_counter() - t
    return t_local, t_comm


def mask_work(batches) -> float:
    """What the plain mean needs instead: the supervised mask of each micro-batch and its count."""
    t = time.perf_counter()
    for b in batches:
        m = (b["labels"] != lossmod.IGNORE_INDEX).float()
        int(m.sum())
    return time.perf_counter() - t


def report(r: dict, args) -> str:
    ms, cpu = r["step_ms"], r["cpu_step_ms"]
    vc, oc = r["vlmft_collectives_per_step"], r["deepspeed_collectives_per_step"]
    q, cq = r["step_diff_quartiles_ms"], r["cpu_diff_quartiles_ms"]
    lines = [
        (f"world {r['world']}, {r['micro_batches_per_rank']} micro-batch(es)/rank/step, "
         f"{r['tokens_per_rank_step']:.0f} tokens/rank/step, reduction {r['reduction']}, "
         f"ZeRO-{r['zero_stage']}, {args.steps} steps per path"),
        (f"step time (median): normalized {ms['normalized']:.1f} ms, plain mean {ms['plain_mean']:.1f} ms, "
         f"paired difference {r['step_diff_ms']:+.1f} ms ({r['step_diff_pct']:+.1f}%; "
         f"quartiles {q[0]:+.1f} .. {q[1]:+.1f} ms)"),
        (f"process CPU time per step (median): normalized {cpu['normalized']:.1f} ms, plain mean "
         f"{cpu['plain_mean']:.1f} ms, paired difference {r['cpu_diff_ms']:+.1f} ms ({r['cpu_diff_pct']:+.1f}%; "
         f"quartiles {cq[0]:+.1f} .. {cq[1]:+.1f} ms)"),
        (f"normalization work per step (direct, median of {args.repeat}x{args.steps}): "
         f"{r['normalization_ms']:.3f} ms (local {r['normalization_local_ms']:.3f}, all-reduces "
         f"{r['normalization_allreduce_ms']:.3f}; plain mean's mask/count: {r['plain_mask_ms']:.3f} ms) "
         f"= {r['normalization_pct_of_step']:.2f}% of the step"),
        (f"collectives per step from vlmft code: normalized {vc['normalized']:g} "
         f"(direct: {r['vlmft_collectives_in_normalization']}), plain mean {vc['plain_mean']:g}; others "
         f"(DeepSpeed's, through torch.distributed's public functions; a lower bound): "
         f"{oc['normalized']:g} / {oc['plain_mean']:g}"),
    ]
    if r["bare_allreduce_us"] is not None:
        lines.append(f"one bare all-reduce of 5 float64 here: {r['bare_allreduce_us']:.0f} us")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per path")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per path first")
    ap.add_argument("--repeat", type=int, default=20, help="repeats of the direct timing")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    setup_environment()
    rank, world = _init_distributed()
    recipe = load(ROOT / "recipes" / "demo.yaml", ["output_dir=/tmp/vlmft-bench-loss", *args.overrides])
    torch.manual_seed(recipe.train.seed)
    processor = load_processor(recipe.model)
    model = load_model(recipe.model, "fp32")
    catalog = build_catalog(recipe, processor)
    plan = PackPlan(recipe, catalog)
    mat = Materializer(recipe, catalog, processor)
    optimizer, _ = optim.build_optimizer(model, recipe.optim)
    sched = schedule.scheduler(optimizer, recipe.schedule, 10**6)
    fam = family_of(processor)
    module = LossModule(model, fam, recipe.loss.chunk_size, blank=fam.blank(processor) if world > 1 else None)
    eng = ds.initialize(module, optimizer, sched, recipe, world)

    n_steps = args.warmup + args.steps
    steps = [[mat.micro_batch(p) for p in plan.rank_step(k, rank, world)] for k in range(n_steps)]
    bare_us = None
    if dist.is_initialized() and world > 1:  # what one all-reduce of a few numbers costs here
        x = torch.zeros(5, dtype=torch.float64, device=eng.device)
        for _ in range(20):
            dist.all_reduce(x)
        t = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(x)
        bare_us = 1e6 * (time.perf_counter() - t) / 200
    counter = CollectiveCounter()
    times = {"normalized": [], "plain_mean": []}
    cpu = {"normalized": [], "plain_mean": []}
    colls = {"normalized": [], "plain_mean": []}
    for k, batches in enumerate(steps):
        # both paths on the same micro-batches, in alternating order
        for path in (("normalized", "plain_mean") if k % 2 == 0 else ("plain_mean", "normalized")):
            if dist.is_initialized():
                dist.barrier()
            counter.take()
            t, c0 = time.perf_counter(), time.process_time()
            if path == "normalized":
                train_step(eng, batches, recipe, world)
            else:
                plain_mean_step(eng, module, batches)
            dt, dc = time.perf_counter() - t, time.process_time() - c0
            c = counter.take()
            if k >= args.warmup:
                times[path].append(dt)
                cpu[path].append(dc)
                colls[path].append(c)

    dev = eng.device
    work, local, comm, base = [], [], [], []
    for _ in range(args.repeat):
        for batches in steps[args.warmup:]:
            a, b = normalization_work(batches, recipe, world, dev)
            local.append(a)
            comm.append(b)
            work.append(a + b)
            base.append(mask_work(batches))
    counter.take()
    normalization_work(steps[0], recipe, world, dev)
    direct_colls = counter.take()

    med = {p: statistics.median(v) for p, v in times.items()}
    diffs = sorted(a - b for a, b in zip(times["normalized"], times["plain_mean"]))
    paired = statistics.median(diffs)
    q1, q3 = (diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4])
    cdiffs = sorted(a - b for a, b in zip(cpu["normalized"], cpu["plain_mean"]))
    cpu_med = {p: statistics.median(v) for p, v in cpu.items()}
    micro = len(steps[0])
    res = {
        "world": world, "grad_accum_steps": recipe.train.grad_accum_steps,
        "micro_batches_per_rank": micro,
        "reduction": recipe.loss.reduction, "zero_stage": recipe.engine.zero_stage,
        "tokens_per_rank_step": statistics.mean(sum(b["input_ids"].numel() for b in s) for s in steps),
        "steps_timed_per_path": args.steps,
        "step_ms": {p: 1e3 * v for p, v in med.items()},
        "step_diff_ms": 1e3 * paired,
        "step_diff_pct": 100 * paired / med["plain_mean"],
        "step_diff_quartiles_ms": [1e3 * q1, 1e3 * q3],
        "cpu_step_ms": {p: 1e3 * v for p, v in cpu_med.items()},
        "cpu_diff_ms": 1e3 * statistics.median(cdiffs),
        "cpu_diff_pct": 100 * statistics.median(cdiffs) / cpu_med["plain_mean"],
        "cpu_diff_quartiles_ms": [1e3 * cdiffs[len(cdiffs) // 4],
                                  1e3 * cdiffs[(3 * len(cdiffs)) // 4]],
        "normalization_ms": 1e3 * statistics.median(work),
        "normalization_local_ms": 1e3 * statistics.median(local),
        "normalization_allreduce_ms": 1e3 * statistics.median(comm),
        "plain_mask_ms": 1e3 * statistics.median(base),
        # the share of the step: the normalization's work less the mask/count a plain mean needs too
        "normalization_pct_of_step":
            100 * (statistics.median(work) - statistics.median(base)) / med["normalized"],
        "vlmft_collectives_per_step": {p: statistics.mean(c["vlmft"] for c in v) for p, v in colls.items()},
        "deepspeed_collectives_per_step": {p: statistics.mean(c["other"] for c in v)
                                           for p, v in colls.items()},
        "vlmft_collectives_in_normalization": direct_colls["vlmft"],
        "bare_allreduce_us": bare_us,
    }
    if rank == 0:
        print(json.dumps(res) if args.json else report(res, args))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
