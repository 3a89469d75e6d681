"""The training loop, top to bottom.

    train(recipe)
      resume_point   which checkpoint to continue from, and whether the recipe may (before
                     anything heavy: a refused resume costs nothing)
      build          family + processor -> catalog (planned samples) -> model -> parameter
                     groups + schedule -> DeepSpeed engine (+ checkpoint) -> step loader -> Run
      loop           for each step: train_step -> bad-data budget -> metrics -> checkpoint
                     cadence -> stop on a signal or on too many non-finite steps
      finish         the final HF folder, the loss summary

``train_step`` is the one place where the loss is normalized (loss.py has the algebra).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import engine as ds
from . import lora
from . import loss as lossmod
from . import optim, per_dataset, schedule, train_eval
from .data import drops, epochs
from .data.catalog import build_catalog
from .data.loader import StepLoader, bad_fraction_error
from .distributed import all_reduce_sum
from .distributed import init as init_distributed
from .forward import LossModule, model_inputs, to_device
from .metrics import Metrics, peak_flops, wandb_settings
from .mfu import model_flops
from .model import attention_note, load_family, load_model
from .preemption import Preemption
from .recipe import Recipe, RecipeError, to_dict, to_yaml
from .resume import compare


@dataclass
class TrainResult:
    final: str              # the exported HF folder
    steps: int
    skipped_steps: int      # steps with nothing supervised anywhere
    dropped: dict           # reason -> count
    rank: int
    world_size: int
    model: nn.Module        # the trained HF model (partitioned under ZeRO-3)
    preempted: bool = False  # stopped by SIGTERM/SIGINT after saving a checkpoint
    nonfinite_steps: int = 0  # steps skipped for a non-finite gradient norm


@dataclass
class StepResult:
    loss: float
    tokens: int
    supervised: int
    samples: int
    bad: int                # samples that failed to materialize (all ranks)
    skipped: bool           # nothing supervised anywhere: no update
    stop: bool = False      # some rank was signalled (SIGTERM/SIGINT): every rank saves and exits
    nonfinite: bool = False  # the global gradient norm was not finite: no update
    dataset_sums: list = field(default_factory=list)     # per training dataset: sum c_t l_t (all ranks)
    dataset_weights: list = field(default_factory=list)  # ... and sum c_t


def step_counts(batches: list[dict], reduction: str, stop: bool = False, device=None, n_datasets: int = 0):
    """This rank's per-token weights of each micro-batch (computed once: summed for W, then
    passed to the loss) and the vector [W, tokens, supervised, samples, bad, stop, W_0..W_{n-1}]
    (W_i: dataset i's part of W, vlmft/per_dataset.py) that the step all-reduces once before
    its first backward."""
    weights = [lossmod.token_weights(b["labels"], b["sample_ids"], b.get("loss_weight"), reduction)
               for b in batches]
    local_w = sum((w.sum(dtype=torch.float64) for w in weights), torch.zeros((), dtype=torch.float64))
    counts = torch.tensor([
        float(local_w),
        sum(b["input_ids"].numel() for b in batches),
        sum(int((b["labels"] != lossmod.IGNORE_INDEX).sum()) for b in batches),
        sum(b["num_samples"] for b in batches),
        sum(b.get("num_bad", 0) for b in batches),
        float(stop)], dtype=torch.float64, device=device)
    if n_datasets:
        counts = torch.cat([counts, per_dataset.weight_sums(weights, batches, n_datasets).to(device)])
    return weights, counts


def train_step(eng, batches: list[dict], recipe: Recipe, world: int, stop: bool = False,
               n_datasets: int = 0) -> StepResult:
    """One optimizer step over this rank's micro-batches.

    W = the step's global weight sum over all ranks and micro-batches (one all-reduce, before
    the first backward). Each micro-batch backpropagates S_mb / W * world with DeepSpeed's own
    1/grad_accum_steps off; DeepSpeed's average over ranks then leaves exactly grad L, where
    L = sum S_mb / W over the whole step (loss.py derives it). Clipping sees that gradient.
    The per-token weights are computed once (for W and for each S_mb); the only other
    collective of ours is the all-reduce of the logged loss, which overlaps the optimizer step.
    With ``n_datasets`` the batches carry ``sample_dataset`` and the logged loss is also split
    per training dataset (its parts of S and W ride in the same two all-reduces).
    A step whose gradient is not finite is skipped everywhere (:func:`_optimizer_step`).
    """
    dev = eng.device
    weights, counts = step_counts(batches, recipe.loss.reduction, stop, dev, n_datasets)
    counts = all_reduce_sum(counts)  # the step's one collective before the first backward
    W = counts[0].float()
    tokens, supervised, samples, bad, stops = (int(x) for x in counts[1:6].tolist())
    w_ds = counts[6:].tolist()
    if lossmod.step_is_empty(W):  # nothing supervised anywhere: skip, never NaN
        eng.lr_scheduler.step()
        return StepResult(float("nan"), tokens, supervised, samples, bad, skipped=True, stop=stops > 0)
    # ZeRO-3: the same head calls in every micro-batch on every rank, so DeepSpeed's trace holds
    n_chunks = lossmod.chunks_needed(recipe.train.micro_batch_size * recipe.data.packing.max_packed_tokens,
                                     recipe.loss.chunk_size) if recipe.engine.zero_stage == 3 else None
    s_sum = torch.zeros((), device=dev)
    parts = torch.zeros(n_datasets, dtype=torch.float64, device=dev)
    pending, applied = None, True
    module = eng.module  # forward.LossModule
    for i, b in enumerate(batches):
        inputs = to_device(model_inputs(module.family, module.model, b), dev)
        if n_datasets:
            inputs["groups"] = per_dataset.token_datasets(b).to(dev)
        s = eng(inputs, weights[i].to(dev), n_chunks=n_chunks, groups=n_datasets)
        if n_datasets:
            s, part = s
            parts += part
        ds.backward(eng, lossmod.scaled_loss(s, W, world))
        s_sum += s.detach().float()
        last = i == len(batches) - 1
        if last and n_datasets:
            parts = torch.cat([s_sum.double().view(1), parts])
        if last and world > 1:  # the logged L = sum of S over ranks / W: summed while DeepSpeed steps
            import torch.distributed as dist

            pending = dist.all_reduce(parts if n_datasets else s_sum, op=dist.ReduceOp.SUM, async_op=True)
        applied = _optimizer_step(eng, module.model, recipe.engine.zero_stage, last)
    if pending is not None:
        pending.wait()
    if not applied:
        eng.lr_scheduler.step()  # ZeRO's skip leaves the schedule behind; an empty step moves it
    loss = float(parts[0] / counts[0]) if n_datasets else float(s_sum / W)
    return StepResult(loss, tokens, supervised, samples, bad, skipped=not applied, stop=stops > 0,
                      nonfinite=not applied, dataset_sums=parts[1:].tolist(), dataset_weights=w_ds)


def _optimizer_step(eng, model: nn.Module, zero_stage: int, last: bool) -> bool:
    """DeepSpeed's step after a micro-batch's backward (the update itself after the last one);
    whether the update went in.

    Finite guard: a step whose global gradient norm is not finite (a NaN or inf loss on any
    rank makes it so) changes no weight and no optimizer state on any rank: ZeRO 1-3 find it in
    the norm they all-reduce for clipping and skip the update everywhere (no new collective);
    without ZeRO the gradients are already averaged after the last backward, so every rank sees
    the same non-finite value and drops them before the step. The LR schedule moves on, as for
    an empty step (train_step)."""
    if last and zero_stage == 0 and not _grads_finite(model):
        model.zero_grad(set_to_none=True)  # the optimizer then updates nothing
        eng.step()
        return False
    eng.step()
    return eng.was_step_applied() if last else True


def _grads_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------
# train(): resume_point -> build -> loop -> finish


@dataclass
class Run:
    """Everything one training run holds, built once by :func:`build`."""
    recipe: Recipe
    rank: int
    world: int
    out: Path
    processor: object
    catalog: object
    model: nn.Module
    optimizer: object
    eng: object
    loader: StepLoader
    metrics: Metrics
    start: int
    resumed_from: Path | None
    step: int = 0
    skipped: int = 0
    nonfinite: int = 0           # steps with a non-finite gradient norm, in all
    nonfinite_run: int = 0       # ... in a row, up to now
    bad: int = 0                 # samples that failed to materialize (all ranks)
    seen: int = 0                # samples read (good and bad, all ranks)
    preempted: bool = False
    losses: list = field(default_factory=list)
    names: list = field(default_factory=list)   # the training datasets (catalog order)
    evaluator: object = None     # eval.Evaluator when data.eval is set
    adaptive: object = None      # data.adaptive.AdaptiveWeights when data.adaptive is on


def train(recipe: Recipe, resume: str | None = None, force: bool = False) -> TrainResult:
    rank, world = init_distributed()
    torch.manual_seed(recipe.train.seed)
    resume_from, saved = resume_point(recipe, resume, force, rank, world)
    run = build(recipe, rank, world, resume_from, saved)
    loop(run)
    return finish(run)


def resume_point(recipe: Recipe, resume: str | None, force: bool, rank: int, world: int):
    """(checkpoint folder or None, its vlmft state or None); RecipeError when the recipe
    changed in ways that break exactness (unless ``force``)."""
    ckpt_dir = Path(recipe.output_dir) / "checkpoints"
    resume_from = ckpt.resolve_resume(ckpt_dir, resume) if resume else None
    saved = ckpt.saved_state(resume_from) if resume_from else None
    if saved:
        warnings, refusals = compare(saved["recipe"], to_dict(recipe), saved["world_size"], world,
                                     defaults=to_dict(Recipe()))
        if refusals and not force:
            raise RecipeError([f"resume from {resume_from}: {r}" for r in refusals]
                              + ["(these changes break exact resumption; pass --force to resume anyway)"])
        for w in warnings + (refusals if force else []):
            if rank == 0:
                print(f"vlmft: resume: {w}", file=sys.stderr)
    return resume_from, saved


def build(recipe: Recipe, rank: int, world: int, resume_from, saved) -> Run:
    _, fam, processor = load_family(recipe.model, recipe.data)
    catalog = build_catalog(recipe, processor)  # before the weights: bad data fails fast
    # nothing dropped silently: the drop table, then the per-dataset budget (vlmft/data/drops.py)
    if rank == 0 and drops.table_lines(catalog):
        print("\n".join(drops.table_lines(catalog)), file=sys.stderr)
    if drops.budget_errors(catalog, recipe.data.max_bad_fraction):
        raise RecipeError(drops.budget_errors(catalog, recipe.data.max_bad_fraction))
    names = [d.name for d in catalog.datasets]
    evaluator, adaptive = train_eval.setup(recipe, processor, names, rank, world, saved)
    recipe, steps_note = epochs.resolve(recipe, catalog, world)  # train.epochs -> max_steps
    if rank == 0 and steps_note:
        print(steps_note, file=sys.stderr)
    targets = lora.resolve_before_load(recipe.model, recipe.lora)  # a bad lora glob: before the weights
    with ds.zero3_init(ds.ds_config(recipe, world)):  # ZeRO-3: partitioned as it is built
        model = load_model(recipe.model, recipe.engine.precision,  # in the training dtype (model.py)
                           lora.quantization(recipe.lora, recipe.engine.precision, targets))
    # what is random from here on (LoRA's init, dropout) depends on the seed alone, not on how
    # much of the RNG loading drew (ZeRO-3's partitioned build draws; without this, ZeRO-2 and
    # ZeRO-3 runs of one recipe started from lora_A matrices 140% apart: tests/test_lora_dist.py)
    torch.manual_seed(recipe.train.seed)
    model = lora.apply(model, recipe.lora, targets)  # LoRA adapters in place (off: the model as is)
    note = attention_note(model, recipe.model.gradient_checkpointing, recipe.data.packing.enabled
                          and recipe.train.micro_batch_size * recipe.data.packing.max_packed_tokens)
    if rank == 0 and note:
        print(note, file=sys.stderr)
    optimizer, _rows = optim.build_optimizer(model, recipe.optim)
    if recipe.engine.offload_optimizer:
        optimizer = ds.offload_optimizer(optimizer)
    scheduler = schedule.scheduler(optimizer, recipe.schedule, recipe.train.max_steps)
    module = LossModule(model, fam, recipe.loss.chunk_size, blank=fam.blank(processor) if world > 1 else None)
    # ZeRO shards saved by another number of ranks load through DeepSpeed's universal format
    universal = bool(saved) and saved["world_size"] != world and recipe.engine.zero_stage > 0
    eng = ds.initialize(module, optimizer, scheduler, recipe, world, load_universal=universal)
    start, stream_state = 0, None
    if saved:
        ckpt.load(eng, resume_from, universal=universal)
        stream_state, start = saved["stream"], int(saved["step"])
    out = Path(recipe.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
    loader = StepLoader(recipe, catalog, processor, rank, world, start_step=start)
    if stream_state:
        loader.load_state_dict(stream_state)  # O(1): no replay of earlier steps
    metrics = Metrics(recipe.output_dir, recipe.train.max_steps, start, rank, recipe.log.tensorboard,
                      wandb=wandb_settings(recipe.log, out, to_dict(recipe)))
    metrics.print(f"vlmft: {world} rank(s), {len(catalog.samples)} samples "
                  f"({sum(catalog.dropped.values())} dropped), zero stage {recipe.engine.zero_stage}, "
                  f"{recipe.engine.precision}, steps {start + 1}..{recipe.train.max_steps}"
                  + (f", resumed from {resume_from}" if resume_from else ""))
    # the bad-data budget counts planning drops and materialization failures against samples read
    return Run(recipe, rank, world, out, processor, catalog, model, optimizer, eng, loader, metrics,
               start, resume_from, step=start, bad=sum(catalog.dropped.values()), seen=len(catalog.records),
               names=names, evaluator=evaluator, adaptive=adaptive)


def loop(run: Run) -> None:
    recipe, preempt = run.recipe, Preemption()
    t0 = time.perf_counter()
    try:
        for step, batches, t_data in run.loader:
            extra = train_eval.weigh(run.adaptive, run.catalog.datasets, batches)
            r = train_step(run.eng, batches, recipe, run.world, stop=preempt.flag, n_datasets=len(run.names))
            dt = time.perf_counter() - t0
            run.step = step + 1
            _account(run, r)
            if run.evaluator and run.evaluator.due(run.step, recipe.train.max_steps):
                extra.update(train_eval.evaluate(run.evaluator, run.adaptive, run.eng, run.model, run.step,
                                                 recipe.engine.zero_stage == 3, run.metrics.print))
            t0 = time.perf_counter()
            if (step + 1) % recipe.log.every_steps == 0 or step + 1 == recipe.train.max_steps or _stop(run) \
                    or any(k.startswith("eval/") for k in extra):
                run.metrics.log({**_row(run, r, batches, dt, t_data), **extra})
            if _stop(run):
                raise RecipeError([_stop(run)])
            run.preempted = r.stop
            every = recipe.checkpoint.every_steps
            if run.preempted or (every and run.step % every == 0 and run.step < recipe.train.max_steps):
                ckpt.save(run.eng, run.out / "checkpoints", run.step, recipe.checkpoint.keep_last,
                          {"step": run.step, "stream": run.loader.state_dict(), "recipe": to_dict(recipe),
                           "world_size": run.world,
                           "adaptive": run.adaptive.state_dict() if run.adaptive else None})
            if run.preempted:
                run.metrics.print(f"vlmft: signal received; saved {run.out}/checkpoints/step{run.step}, "
                                  "exiting (continue with --resume auto)")
                break
    finally:
        preempt.restore()
        run.metrics.close()


def _account(run: Run, r: StepResult) -> None:
    """Counters after a step (global counts: every rank holds the same)."""
    run.skipped += r.skipped and not r.nonfinite
    run.nonfinite += r.nonfinite
    run.nonfinite_run = run.nonfinite_run + 1 if r.nonfinite else 0
    run.bad, run.seen = run.bad + r.bad, run.seen + r.samples + r.bad
    run.losses.append(r.loss)


def _stop(run: Run) -> str | None:
    """Why the run must stop now (every rank decides alike), or None."""
    msg = bad_fraction_error(run.bad, run.seen, run.recipe.data.max_bad_fraction, examples=run.catalog.examples)
    if msg:
        return msg
    limit = run.recipe.train.max_nonfinite_steps
    if run.nonfinite_run >= limit:
        return (f"step {run.step}: the gradient norm was not finite in {limit} steps in a row "
                f"(train.max_nonfinite_steps={limit}); no update was made in them and nothing new was "
                "saved. Lower optim.lr, check the data, or resume from the last checkpoint")
    return None


def _row(run: Run, r: StepResult, batches: list[dict], dt: float, t_data: float) -> dict:
    """One metrics.jsonl object (MFU of this rank: its own tokens against its own device's peak)."""
    recipe, model = run.recipe, run.model
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    flops = model_flops(model, batches)  # this rank's step, vlmft/mfu.py
    factor = schedule.lr_factor(run.step - 1, recipe.schedule, recipe.train.max_steps)
    cap = recipe.data.packing.max_packed_tokens
    return {
        "step": run.step, "loss": r.loss, "lr": recipe.optim.lr * factor,
        "grad_norm": _grad_norm(run.eng), "tokens": r.tokens, "supervised_tokens": r.supervised,
        "samples": r.samples, "tokens_per_s": r.tokens / dt, "supervised_tokens_per_s": r.supervised / dt,
        "samples_per_s": r.samples / dt, "fill": r.tokens / (recipe.train.global_batch(run.world) * cap),
        "data_wait_s": t_data, "step_time_s": dt, "peak_memory_gb": _peak_memory_gb(),
        "model_flops": flops, "mfu": flops / dt / peak if peak else None,
        # the LR each group used in this step (the scheduler has already moved on)
        "lr_groups": {g["name"]: recipe.optim.lr * g["lr_scale"] * factor for g in run.optimizer.param_groups},
        "bad_samples": run.bad, "skipped_steps": run.skipped, "nonfinite_steps": run.nonfinite,
        **per_dataset.train_losses(r.dataset_sums or [0.0] * len(run.names),
                                   r.dataset_weights or [0.0] * len(run.names), run.names)}


def finish(run: Run) -> TrainResult:
    final = run.out / "final"
    if not run.preempted:
        ckpt.export(run.eng, run.model, run.processor, str(final),
                    adapter=str(run.out / "adapter") if run.recipe.lora.enabled else None)
        if len(run.losses) >= 20:
            head, tail = _mean(run.losses[:10]), _mean(run.losses[-10:])
            run.metrics.print(f"vlmft: mean loss of the first 10 steps {head:.4f}, of the last 10 {tail:.4f}")
    steps = run.step if run.recipe.train.max_steps > run.start else run.start
    return TrainResult(final=str(final), steps=steps, skipped_steps=run.skipped,
                       dropped=dict(run.catalog.dropped), rank=run.rank, world_size=run.world,
                       model=run.model, preempted=run.preempted, nonfinite_steps=run.nonfinite)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _grad_norm(eng) -> float:
    g = eng.get_global_grad_norm()
    if g is None:
        return float("nan")
    g = float(g)
    return g if math.isfinite(g) else float("nan")
