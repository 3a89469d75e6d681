"""The training loop, top to bottom.

    recipe -> distributed -> processor + model -> catalog (planned samples) -> pack plan
           -> param groups + schedule -> DeepSpeed engine -> for each step: train_step -> export

``train_step`` is the one place where the loss is normalized (loss.py has the algebra).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import engine as ds
from . import loss as lossmod
from . import optim, schedule
from .data import drops, epochs
from .data.catalog import build_catalog
from .data.loader import StepLoader, bad_fraction_error
from .metrics import Metrics, model_flops, peak_flops, sum_sq_lengths
from .model import load_model, load_processor
from .recipe import Recipe, RecipeError, to_dict, to_yaml
from .resume import compare

BATCH_KEYS = ("input_ids", "position_ids", "labels", "sample_ids", "loss_weight", "pixel_values")


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward(micro-batch) -> S_mb, the weighted CE sum (not a mean).

    The HF model's own ``labels=`` loss would shift targets across packed samples and average
    per micro-batch; we take the last hidden states and run the head in chunks instead.
    """

    def __init__(self, model: nn.Module, reduction: str, chunk_size: int, vision_every_step: bool):
        super().__init__()
        self.model = model
        self.reduction = reduction
        self.chunk_size = chunk_size
        # With several ranks every rank must run the vision tower in every micro-batch, images
        # or not: ZeRO-3 gathers its parameters with a collective when it runs, and ZeRO 1/2
        # reduce gradients in buckets that must be the same on every rank (a text-only rank
        # measured a gloo size mismatch, 186144 vs 123456 elements). A text-only micro-batch
        # feeds one blank tile and adds 0 x its features: exactly zero, once per micro-batch,
        # never a dummy tile inside a sample. One process needs none of this.
        self.vision_every_step = vision_every_step

    def forward(self, input_ids, position_ids, labels, sample_ids, loss_weight, pixel_values=None,
                n_chunks=None, weights=None):
        """S_mb. ``weights``: the per-token c_t of :func:`vlmft.loss.token_weights` when the
        caller has them already (train_step does: it sums them for W); else computed here."""
        dtype = next(self.model.parameters()).dtype
        base = self.model.model
        blank = []
        if pixel_values is None and self.vision_every_step:
            # Run the blank tile exactly where images would run (after the token embeddings,
            # before the language model), so ZeRO-3 gathers parameters in the same order on
            # every rank and every micro-batch.
            size = self.model.config.vision_config.image_size
            h, w = (size, size) if isinstance(size, int) else size
            tile = torch.zeros(1, 3, h, w, dtype=dtype, device=input_ids.device)
            hook = base.language_model.register_forward_pre_hook(
                lambda *_: blank.append(base.get_image_features(pixel_values=tile).pooler_output),
                prepend=True)  # before ZeRO-3's own pre-hook records the language model
        try:
            out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                       pixel_values=None if pixel_values is None else pixel_values.to(dtype),
                       use_cache=False)
        finally:
            if pixel_values is None and self.vision_every_step:
                hook.remove()
        hidden, head = out.last_hidden_state, self.model.get_output_embeddings()
        if weights is None:
            batch = {"labels": labels, "sample_ids": sample_ids, "loss_weight": loss_weight}
            s = lossmod.micro_batch_sum(hidden, head, batch, self.reduction, self.chunk_size,
                                        n_chunks=n_chunks)
        else:
            s = lossmod.weighted_ce_sum(hidden, head, labels.to(hidden.device),
                                        weights.to(hidden.device), self.chunk_size, n_chunks=n_chunks)
        for feats in blank:
            s = s + 0.0 * feats.float().sum()
        return s


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


@dataclass
class StepResult:
    loss: float
    tokens: int
    supervised: int
    samples: int
    bad: int                # samples that failed to materialize (all ranks)
    skipped: bool
    stop: bool = False      # some rank was signalled (SIGTERM/SIGINT): every rank saves and exits


def step_counts(batches: list[dict], reduction: str, stop: bool = False, device=None):
    """This rank's per-token weights of each micro-batch (computed once: summed for W, then
    passed to the loss) and the vector [W, tokens, supervised, samples, bad, stop] that the
    step all-reduces once before its first backward."""
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
    return weights, counts


def train_step(eng, batches: list[dict], recipe: Recipe, world: int, stop: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches.

    W = the step's global weight sum over all ranks and micro-batches (one all-reduce, before
    the first backward). Each micro-batch backpropagates S_mb / W * world with DeepSpeed's own
    1/grad_accum_steps off; DeepSpeed's average over ranks then leaves exactly grad L, where
    L = sum S_mb / W over the whole step (loss.py derives it). Clipping sees that gradient.
    The per-token weights are computed once (for W and for each S_mb); the only other
    collective of ours is the all-reduce of the logged loss, which overlaps the optimizer step.
    """
    import torch.distributed as dist

    dev = eng.device
    red = recipe.loss.reduction
    weights, counts = step_counts(batches, red, stop, dev)
    counts = ds.all_reduce_sum(counts)  # the step's one collective before the first backward
    W = counts[0].float()
    tokens, supervised, samples, bad, stops = (int(x) for x in counts[1:].tolist())
    if lossmod.step_is_empty(W):  # nothing supervised anywhere: skip, never NaN
        eng.lr_scheduler.step()
        return StepResult(float("nan"), tokens, supervised, samples, bad, skipped=True, stop=stops > 0)
    # The engine's own stage: ZeRO-3 may also come from engine.deepspeed.zero_optimization.
    n_chunks = _agreed_chunks(batches, recipe, dev) if eng.zero_optimization_stage() == 3 else None
    s_sum = torch.zeros((), device=dev)
    pending = None
    for i, b in enumerate(batches):
        inputs = {k: (b[k].to(dev) if b[k] is not None else None) for k in BATCH_KEYS}
        s = eng(**inputs, n_chunks=None if n_chunks is None else n_chunks[i],
                weights=weights[i].to(dev))
        ds.backward(eng, lossmod.scaled_loss(s, W, world))
        s_sum += s.detach().float()
        if i == len(batches) - 1 and dist.is_initialized() and dist.get_world_size() > 1:
            # the logged L = sum of S over ranks / W: summed while DeepSpeed steps
            pending = dist.all_reduce(s_sum, op=dist.ReduceOp.SUM, async_op=True)
        eng.step()
    if pending is not None:
        pending.wait()
    loss = s_sum / W
    return StepResult(float(loss), tokens, supervised, samples, bad, skipped=False, stop=stops > 0)


def _agreed_chunks(batches: list[dict], recipe: Recipe, device=None) -> list[int]:
    """Under ZeRO-3 every rank must call the head the same number of times per micro-batch.
    The counts live on the engine's device: nccl all-reduces no CPU tensor."""
    import torch.distributed as dist

    need = torch.tensor([lossmod.chunks_needed(int((b["labels"] != lossmod.IGNORE_INDEX).sum()),
                                               recipe.loss.chunk_size) for b in batches], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return need.tolist()


class _Preemption:
    """SIGTERM/SIGINT set a flag; train_step sums it over ranks with its step counts (no extra
    collective), and every rank saves at the end of that step and exits 0."""

    def __init__(self):
        self.flag = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(recipe: Recipe, resume: str | None = None, force: bool = False) -> TrainResult:
    rank, world = ds.init_distributed()
    torch.manual_seed(recipe.train.seed)
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = ds.resolve_resume(ckpt_dir, resume) if resume else None
    saved = ds.saved_state(resume_from) if resume_from else None
    if saved:  # before anything heavy: a refused resume costs nothing
        warnings, refusals = compare(saved["recipe"], to_dict(recipe), saved["world_size"], world)
        if refusals and not force:
            raise RecipeError([f"resume from {resume_from}: {r}" for r in refusals]
                              + ["(these changes break exact resumption; pass --force to resume anyway)"])
        for w in warnings + (refusals if force else []):
            if rank == 0:
                print(f"vlmft: resume: {w}", file=sys.stderr)
    processor = load_processor(recipe.model)
    catalog = build_catalog(recipe, processor)  # before the weights: bad data fails fast
    # nothing dropped silently: the drop table, then the per-dataset budget (vlmft/data/drops.py)
    if rank == 0 and drops.table_lines(catalog):
        print("\n".join(drops.table_lines(catalog)), file=sys.stderr)
    if drops.budget_errors(catalog, recipe.data.max_bad_fraction):
        raise RecipeError(drops.budget_errors(catalog, recipe.data.max_bad_fraction))
    recipe, steps_note = epochs.resolve(recipe, catalog, world)  # train.epochs -> max_steps
    if rank == 0 and steps_note:
        print(steps_note, file=sys.stderr)
    model = load_model(recipe.model, "fp32")  # DeepSpeed casts for bf16/fp16, keeps fp32 masters
    optimizer, _rows = optim.build_optimizer(model, recipe.optim)
    if recipe.engine.offload_optimizer:
        optimizer = ds.offload_optimizer(optimizer)
    scheduler = schedule.scheduler(optimizer, recipe.schedule, recipe.train.max_steps)
    module = LossModule(model, recipe.loss.reduction, recipe.loss.chunk_size,
                        vision_every_step=world > 1)
    # ZeRO shards saved by another number of ranks load through DeepSpeed's universal format
    universal = bool(saved) and saved["world_size"] != world and recipe.engine.zero_stage > 0
    eng = ds.initialize(module, optimizer, scheduler, recipe, world, load_universal=universal)

    start, stream_state = 0, None
    if saved:
        ds.load(eng, resume_from, universal=universal)
        stream_state, start = saved["stream"], int(saved["step"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
    metrics = Metrics(recipe.output_dir, recipe.train.max_steps, start, rank, recipe.log.tensorboard)
    metrics.print(f"vlmft: {world} rank(s), {len(catalog.samples)} samples "
                  f"({sum(catalog.dropped.values())} dropped), zero stage {recipe.engine.zero_stage}, "
                  f"{recipe.engine.precision}, steps {start + 1}..{recipe.train.max_steps}"
                  + (f", resumed from {resume_from}" if resume_from else ""))
    text = getattr(model.config, "text_config", model.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    preempt = _Preemption()
    skipped, step, preempted = 0, start, False
    bad, seen = sum(catalog.dropped.values()), len(catalog.records)  # the budget counts planning too
    losses = []
    cap = recipe.data.packing.max_packed_tokens
    loader = StepLoader(recipe, catalog, processor, rank, world, start_step=start)
    if stream_state:
        loader.load_state_dict(stream_state)  # O(1): no replay of earlier steps
    t0 = time.perf_counter()
    for step, batches, t_data in loader:
        r = train_step(eng, batches, recipe, world, stop=preempt.flag)
        skipped += r.skipped
        bad, seen = bad + r.bad, seen + r.samples + r.bad  # global sums: every rank decides alike
        msg = bad_fraction_error(bad, seen, recipe.data.max_bad_fraction, examples=catalog.examples)
        if msg:
            raise RecipeError([msg])
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses.append(r.loss)
        packs = recipe.train.micro_batch_size * recipe.train.grad_accum_steps * world
        if (step + 1) % recipe.log.every_steps == 0 or step + 1 == recipe.train.max_steps:
            # MFU of this rank: its own tokens against its own device's peak
            local = sum(b["input_ids"].numel() for b in batches)
            flops = model_flops(trainable, local, sum_sq_lengths(batches), text.num_hidden_layers,
                                text.hidden_size)
            factor = schedule.lr_factor(step, recipe.schedule, recipe.train.max_steps)
            metrics.log({
                "step": step + 1, "loss": r.loss, "lr": recipe.optim.lr * factor,
                "grad_norm": _grad_norm(eng), "tokens": r.tokens, "supervised_tokens": r.supervised,
                "samples": r.samples, "tokens_per_s": r.tokens / dt, "supervised_tokens_per_s": r.supervised / dt,
                "samples_per_s": r.samples / dt, "fill": r.tokens / (packs * cap),
                "data_wait_s": t_data, "step_time_s": dt, "peak_memory_gb": _peak_memory_gb(),
                "mfu": flops / dt / peak if peak else None,
                # the LR each group used in this step (the scheduler has already moved on)
                "lr_groups": {g["name"]: recipe.optim.lr * g["lr_scale"] * factor for g in optimizer.param_groups},
                "bad_samples": bad, "skipped_steps": skipped})
        done = step + 1
        every = recipe.checkpoint.every_steps
        preempted = r.stop
        if preempted or (every and done % every == 0 and done < recipe.train.max_steps):
            ds.save(eng, ckpt_dir, done, recipe.checkpoint.keep_last,
                    {"step": done, "stream": loader.state_dict(), "recipe": to_dict(recipe), "world_size": world})
        if preempted:
            metrics.print(f"vlmft: signal received; saved {ckpt_dir}/step{done}, exiting "
                          f"(continue with --resume auto)")
            break
    preempt.restore()
    metrics.close()
    final = out / "final"
    if not preempted:
        ds.export(eng, processor, str(final))
        if len(losses) >= 20:
            head, tail = _mean(losses[:10]), _mean(losses[-10:])
            metrics.print(f"vlmft: mean loss of the first 10 steps {head:.4f}, of the last 10 {tail:.4f}")
    return TrainResult(final=str(final), steps=step + 1 if recipe.train.max_steps > start else start,
                       skipped_steps=skipped, dropped=dict(catalog.dropped), rank=rank,
                       world_size=world, model=model, preempted=preempted)


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

