"""Worker for the multi-process DeepSpeed tests: many configurations in one torchrun launch.

    torchrun --standalone --nproc_per_node N tests/dist_worker.py TASK[,TASK...] OUT_DIR [key=value ...]

A launch costs ~8 s (imports, rendezvous); a fresh DeepSpeed engine on the tiny demo model costs
a fraction of a second, so each task loops over its configurations, building a fresh engine for
each, and rank 0 writes OUT_DIR/results.json, one object per task, that the tests compare
(tests/test_distributed_grad.py, tests/test_optim_deepspeed.py). Tasks:

``e2e`` (issue 5, end to end; run first, while the process is fresh): ``vlmft train
recipes/demo.yaml`` (the Typer command, in this process) for three optimizer steps with
grad_accum_steps = 4 / world, so 1 rank x 4 and 2 ranks x 2 see the same global batch; fp32,
optim.eps=1.0 (the update is nearly linear in the gradient), weight decay 0; the launch's extra
``key=value`` arguments are recipe overrides (another model family, its data, a ZeRO stage).
The final folder and metrics.jsonl land in OUT_DIR/e2e; the test compares the two launches.

``grad`` (issue 5): for every reduction x ZeRO stage 1, 2, 3 x accumulation (1 and 3 with one
rank, 1 and 2 with two), one optimizer step through :func:`vlmft.train.train_step` (LossModule,
loss.scaled_loss, engine.backward(..., scale_wrt_gas=False)) on the same ten samples, split into
micro-batches of deliberately uneven token, sample and image counts (one micro-batch has no
supervised token, some are text-only). The optimizer is vlmft's AdamW with eps = 1e8 and
lr = 1e14 on its first step: update = -lr/eps * g / (1 + |g|/eps) = -1e6 g to ~1e-8 relative, on
every stage, so the parameter update read back from DeepSpeed's fp32 partitions gives the gradient
DeepSpeed stepped with (after its rank averaging, and after clipping when clipping is on). Rank 0
compares it with the gradient of L from plain torch in this process (no DeepSpeed, every sample
run alone, unpacked, weights computed here from the definition). Clipping: ZeRO 1, 2, 3 with
``engine.gradient_clipping`` at 0.3 x the true global norm: the update must be the reference
gradient clipped on its global norm (factor max_norm / (norm + 1e-6), the rule of torch's
clip_grad_norm_ and of DeepSpeed). ZeRO-3 asked for through the raw ``engine.deepspeed`` block
(recipe stage 2) must work as well. Empty steps: a step with no supervised token on any rank
(masked labels, or supervised tokens of loss_weight 0) is skipped and counted, leaves the
parameters bit-identical and the next step on the same engine still matches its reference.

``optim`` (issue 6): after deepspeed.initialize with ZeRO 1, 2 and 3, the optimizer's groups
(tests/optim_reference.describe_groups + DeepSpeed's own group membership) against ``lr_table`` (built on
the meta device from the config, as the CLI does) at step 0 and after one step; then every freeze
flag, one engine each: requires_grad against the expected names, and one real training step:
frozen weights bit-identical, every other weight changed.

``eval`` (issue 13): vlmft.eval.evaluate (``vlmft eval``) on the demo's held-out set, the launch's
``key=value`` arguments as recipe overrides, for every loss reduction.

``lora_grad`` (issue 14): ``grad`` on a LoRA-wrapped demo model (ZeRO 2 and 3): the trained
parameters' update against the plain-torch gradient of L, the frozen ones unmoved.

Results are plain numbers; the tests hold the thresholds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmft import engine as ds
from vlmft.distributed import init as _init_distributed
from vlmft.distributed import setup_environment
from vlmft import optim, schedule
from vlmft.data.catalog import build_catalog
from vlmft.data.stream import Materializer
from vlmft.data.stream import row as stream_row
from vlmft.forward import LossModule
from vlmft.model import load_model, load_processor
from vlmft.models import family_of
from vlmft.recipe import load
from vlmft.train import train_step

from optim_reference import describe_groups  # tests/ is on sys.path: this file runs as a script

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
REDUCTIONS = ("token", "sample", "square")
STAGES = (1, 2, 3)
LR, EPS = 1.0e14, 1.0e8
K = LR / EPS  # the first AdamW update is -K * g
X = -100


# ------------------------------------------------------------------------------------------
# Samples and micro-batches


class Samples:
    """Demo samples encoded once (vlmft.data.tokens.encode: token ids and unshifted labels);
    micro-batches are laid out from them by vlmft.data.stream.row, the training layout."""

    def __init__(self, recipe, processor, n_records: int = 30):
        cat = build_catalog(recipe, processor, limit=n_records)
        self.cat = cat
        self.family = family_of(processor)
        mat = Materializer(recipe, cat, processor)
        self.one = [{"enc": mat.sample(ref), "d": 1.0} for ref in cat.samples]

    def info(self, i: int) -> dict:
        s = self.cat.samples[i]
        return {"index": i, "tokens": s.length, "tiles": s.tiles, "n_supervised": s.n_supervised}


def pack(parts: list[dict], family=None) -> dict:
    """Samples laid end to end in one row by the training layout (stream.row)."""
    family = family or _FAMILY[0]
    row = stream_row([p["enc"] for p in parts], [p["d"] for p in parts], family)
    row.update(num_samples=len(parts), num_bad=0)
    return row


_FAMILY: list = []
_PROCESSOR: list = []


def _use(processor) -> None:
    """The processor (and its family) the engines and rows of this launch use."""
    _PROCESSOR[:] = [processor]
    _FAMILY[:] = [family_of(processor)]


def variant(one: dict, d: float = 1.0, masked: bool = False) -> dict:
    """A sample with dataset weight d(s) = d, or with every label masked (-100)."""
    enc = one["enc"]
    if masked:
        enc = dataclasses.replace(enc, labels=[X] * len(enc.labels))
    return {"enc": enc, "d": d}


# The step's ten samples (catalog index, d(s), masked): images with 1 and 2 pictures and text-only
# ones, d(s) in {0.5, 1, 2}, one fully masked. Demo catalog (first 30 records, kinds by index
# mod 6, vlmft/demo_assets.py): 0 one image (colour); 2, 8, 26 one image (two turns); 3 two images;
# 13 one image (shape); 4, 10, 22, 28 text only.
STEP_SAMPLES = [(0, 1.0, False), (3, 2.0, False), (4, 1.0, False), (22, 0.5, False),
                (8, 1.0, False), (10, 1.0, True), (13, 1.0, False), (28, 2.0, False),
                (2, 1.0, False), (26, 0.5, False)]
# How the ten are split into micro-batches for (world, accumulation): rank r takes rows
# [r*acc, (r+1)*acc). Every split is uneven in tokens, samples and images; in (2, 2) rank 0's
# second micro-batch is the masked text-only sample alone (no supervised token) and rank 1 has a
# text-only micro-batch (the blank-tile path) while rank 0 has images.
SPLITS = {
    (1, 1): [list(range(10))],
    (1, 3): [[0, 1, 4, 6, 8, 9], [2], [3, 5, 7]],  # the last two text-only
    (2, 1): [[0, 1], [2, 3, 4, 5, 6, 7, 8, 9]],
    (2, 2): [[0, 1, 4, 6, 8, 9], [5], [3, 7], [2]],  # rank 1: two text-only micro-batches
}


def step_parts(samples: Samples, spec=STEP_SAMPLES) -> list[dict]:
    return [variant(samples.one[i], d, m) for i, d, m in spec]


def rank_batches(parts: list[dict], world: int, acc: int, rank: int) -> list[dict]:
    rows = SPLITS[(world, acc)]
    return [pack([parts[j] for j in row]) for row in rows[rank * acc:(rank + 1) * acc]]


# ------------------------------------------------------------------------------------------
# The reference: plain torch, every sample alone, weights from the definition


def reference_grad(model, parts: list[dict], reduction: str) -> tuple[float, dict]:
    """L and dL/dtheta in one process without DeepSpeed, each sample run unpacked through the
    model's own forward, its labels shifted here (logits at t predict token t + 1), not by the
    training layout.

    L = sum_s d(s) w(n_s) sum_t l_t / sum_s d(s) w(n_s) n_s, n_s = supervised tokens of s."""
    model.zero_grad(set_to_none=True)
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for p in parts:
        enc = p["enc"]
        targets = torch.tensor(enc.labels[1:])
        sup = targets != X
        n = int(sup.sum())
        if n == 0:
            continue
        w = p["d"] * {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
        logits = model(input_ids=torch.tensor([enc.input_ids]), use_cache=False,
                       **enc.vision).logits[0, :-1].float()
        ce = F.cross_entropy(logits[sup], targets[sup], reduction="sum")
        num = num + w * ce.double()
        den += w * n
    loss = num / den
    loss.backward()
    grads = {n: (q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q))
             for n, q in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


# ------------------------------------------------------------------------------------------
# Engines


def recipe_for(stage: int, acc: int, reduction: str = "square", clip: float = 0.0, extra=()):
    return load(DEMO, [f"engine.zero_stage={stage}", "engine.precision=fp32",
                       f"train.grad_accum_steps={acc}", "train.micro_batch_size=1",
                       "train.max_steps=10", f"loss.reduction={reduction}", "loss.chunk_size=8",
                       f"engine.gradient_clipping={clip}", f"optim.lr={LR}", f"optim.eps={EPS}",
                       "optim.weight_decay=0.0", "schedule.name=constant", "schedule.warmup_steps=0",
                       "output_dir=unused", *extra])


def build(base_model, recipe, world: int):
    """A fresh engine on a copy of ``base_model``, exactly as vlmft.train.train builds one."""
    model = copy.deepcopy(base_model)
    optimizer, rows = optim.build_optimizer(model, recipe.optim)
    sched = schedule.scheduler(optimizer, recipe.schedule, recipe.train.max_steps)
    fam = _FAMILY[0]
    module = LossModule(model, fam, recipe.loss.chunk_size,
                        blank=fam.blank(_PROCESSOR[0]) if world > 1 else None)
    eng = ds.initialize(module, optimizer, sched, recipe, world)
    return eng, model, rows


def full_params(eng, model) -> dict:
    """Every parameter in full (fp32), on every rank; collectives under ZeRO-3."""
    params = list(model.named_parameters())
    if eng.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone().float() for n, p in params}
    return {n: p.detach().clone().float() for n, p in params}


def compare(got: dict, ref: dict) -> dict:
    """Relative errors: over all parameters together and the worst tensor. A tensor whose
    reference gradient is below 1e-4 of the global norm is judged against that floor: an
    attention key bias has a true gradient of exactly 0 (softmax ignores a shift shared by all
    keys), so its float gradient is rounding noise (~2e-11 of the global norm measured on the
    demo's CLIP tower), which no relative bar can hold."""
    diff2 = sum(float((got[n].double() - ref[n].double()).norm() ** 2) for n in ref)
    ref2 = sum(float(ref[n].double().norm() ** 2) for n in ref)
    gnorm = math.sqrt(ref2)
    worst, worst_name = 0.0, None
    for n, g in ref.items():
        r = float(g.double().norm())
        e = float((got[n].double() - g.double()).norm()) / max(r, 1e-4 * gnorm)
        if e > worst:
            worst, worst_name = e, n
    return {"rel_global": math.sqrt(diff2) / gnorm, "rel_worst_tensor": worst,
            "worst_tensor": worst_name, "ref_norm": gnorm}


# ------------------------------------------------------------------------------------------
# Task: grad (issue 5)


def task_grad(rank: int, world: int) -> dict:
    recipe0 = recipe_for(1, 1)
    processor = load_processor(recipe0.model)
    _use(processor)
    samples = Samples(recipe0, processor)
    base = load_model(recipe0.model, "fp32")
    parts = step_parts(samples)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}

    refs = {}
    if rank == 0:
        ref_model = copy.deepcopy(base)
        for red in REDUCTIONS:
            refs[red] = reference_grad(ref_model, parts, red)
    out = {"world": world, "samples": [dict(samples.info(i), d=d, masked=m)
                                       for i, d, m in STEP_SAMPLES],
           "splits": {f"{w}x{a}": v for (w, a), v in SPLITS.items()},
           "cases": [], "clip": [], "empty": [], "timing": {}}
    t0 = time.perf_counter()
    accs = [a for (w, a) in SPLITS if w == world]
    for stage in STAGES:
        for acc in accs:
            for red in REDUCTIONS:
                t = time.perf_counter()
                recipe = recipe_for(stage, acc, red)
                eng, model, _ = build(base, recipe, world)
                batches = rank_batches(parts, world, acc, rank)
                r = train_step(eng, batches, recipe, world)
                after = full_params(eng, model)
                case = {"stage": stage, "world": world, "acc": acc, "reduction": red,
                        "loss": r.loss, "skipped": r.skipped, "seconds": time.perf_counter() - t,
                        "rank_tokens": _gather([sum(b["input_ids"].numel() for b in batches)]),
                        "rank_supervised": _gather([sum(int((b["labels"] != X).sum()) for b in batches)]),
                        "rank_samples": _gather([sum(b["num_samples"] for b in batches)])}
                if rank == 0:
                    ref_loss, ref = refs[red]
                    got = {n: (before[n] - after[n]) / K for n in before}
                    case.update(compare(got, ref), ref_loss=ref_loss)
                out["cases"].append(case)
                del eng
    out["timing"]["cases_s"] = time.perf_counter() - t0

    # Clipping: the update must be the reference gradient clipped on its true global norm.
    if world == 2:
        for stage in STAGES:
            red, acc = "square", 2
            ref_loss, ref = refs.get(red, (None, None)) if rank == 0 else (None, None)
            norm = _bcast(math.sqrt(sum(float(g.double().norm() ** 2) for g in ref.values()))
                          if rank == 0 else 0.0)
            clip = 0.3 * norm
            recipe = recipe_for(stage, acc, red, clip=clip)
            eng, model, _ = build(base, recipe, world)
            r = train_step(eng, rank_batches(parts, world, acc, rank), recipe, world)
            after = full_params(eng, model)
            case = {"stage": stage, "world": world, "acc": acc, "reduction": red,
                    "clip": clip, "true_norm": norm, "loss": r.loss}
            if rank == 0:
                # torch.nn.utils.clip_grad_norm_'s rule (and DeepSpeed's): g * max / (norm + 1e-6)
                coef = min(1.0, clip / (norm + 1e-6))
                clipped = {n: g * coef for n, g in ref.items()}
                got = {n: (before[n] - after[n]) / K for n in before}
                case.update(compare(got, clipped), ref_loss=ref_loss,
                            update_norm=math.sqrt(sum(float(g.double().norm() ** 2) for g in got.values())))
                # and the unclipped reference would be far off: clipping did act
                case["rel_vs_unclipped"] = compare(got, ref)["rel_global"]
            out["clip"].append(case)
            del eng

    # Empty step: nothing supervised on any rank -> skipped, counted, no NaN, no update; then a
    # real step on the same engine still matches its reference (its DeepSpeed state is intact).
    for stage in STAGES:
        red = "square"
        acc = max(a for (w, a) in SPLITS if w == world)
        recipe = recipe_for(stage, acc, red)
        eng, model, _ = build(base, recipe, world)
        # masked labels (with and without an image), and supervised tokens with d(s) = 0
        empty = [pack([variant(samples.one[i], masked=True) for i in (0, 4)]),
                 pack([variant(samples.one[10], masked=True)])][:acc - 1]
        empty.append(pack([variant(samples.one[28], d=0.0)]))
        r_empty = train_step(eng, empty, recipe, world)
        mid = full_params(eng, model)
        r = train_step(eng, rank_batches(parts, world, acc, rank), recipe, world)
        after = full_params(eng, model)
        case = {"stage": stage, "world": world, "acc": acc, "skipped": r_empty.skipped,
                "loss": r_empty.loss, "supervised": r_empty.supervised,
                "unchanged": all(torch.equal(mid[n], before[n]) for n in before),
                "next_skipped": r.skipped, "next_loss": r.loss}
        if rank == 0:
            ref_loss, ref = refs[red]
            got = {n: (mid[n] - after[n]) / K for n in before}
            case.update(compare(got, ref), ref_loss=ref_loss)
        out["empty"].append(case)
        del eng
    out["timing"]["total_s"] = time.perf_counter() - t0
    return out


def _gather(values: list) -> list:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.tolist()
    res = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(res, t)
    return [x for r in res for x in r.tolist()]


def _bcast(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, 0)
    return float(t)


# ------------------------------------------------------------------------------------------
# Task: optim (issue 6)

FREEZE_CASES = [  # (override, stage, names it must freeze)
    ("optim.freeze.vision=true", 1, lambda n: n.startswith("model.vision_tower.")),
    ("optim.freeze.projector=true", 2, lambda n: n.startswith(("model.multi_modal_projector.", "model.image_newline"))),
    ("optim.freeze.language=true", 3, lambda n: n.startswith("model.language_model.")),
    ("optim.freeze.lm_head=true", 1, lambda n: n.startswith("lm_head.")),
    ("optim.freeze.vision_first_layers=1", 2,
     lambda n: n.startswith(("model.vision_tower.embeddings.", "model.vision_tower.pre_layrnorm.",
                             "model.vision_tower.encoder.layers.0."))),
    ("optim.freeze.vision_last_layers=1", 3, lambda n: n.startswith("model.vision_tower.encoder.layers.1.")),
]


def optim_recipe(stage: int, extra=()):
    r = load(DEMO, [f"engine.zero_stage={stage}", "engine.precision=fp32", "train.grad_accum_steps=1",
                    "train.max_steps=10", "schedule.warmup_steps=2", "optim.lr=1.0e-2",
                    "optim.weight_decay=0.1", "optim.layer_decay.vision=0.8",
                    "optim.layer_decay.language=0.9", "engine.gradient_clipping=0.0",
                    "output_dir=unused", *extra])
    r.optim.lr_multipliers = {"model.multi_modal_projector.*": 10.0, "*self_attn.k_proj.*": 0.5}
    r.optim.no_decay = ["model.language_model.layers.0.mlp.*"]
    return r


def ds_groups(eng, model) -> list[dict]:
    """Per optimizer group: name, lr, weight_decay (describe_groups) and the member
    parameter names and numel, read from DeepSpeed's own bookkeeping."""
    opt = eng.optimizer
    desc = describe_groups(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    members: list[list[str]] = [[] for _ in desc]
    numel = [0 for _ in desc]
    if eng.zero_optimization_stage() == 3:
        for sub, params in enumerate(opt.fp16_groups):
            g = opt.sub_group_to_group_id[sub]
            members[g] += [names[id(p)] for p in params]
            numel[g] += sum(p.ds_numel for p in params)
    else:
        for g, params in enumerate(opt.bit16_groups):
            members[g] += [names[id(p)] for p in params]
            numel[g] += sum(p.numel() for p in params)
    return [dict(d, members=sorted(m), member_numel=k) for d, m, k in zip(desc, members, numel)]


def table_groups(recipe, step: int) -> list[dict]:
    from vlmft.lr_table import lr_table

    t = lr_table(recipe, step=step, by="param")
    return [dict(g, members=sorted(r["name"] for r in t["rows"] if r["group"] == g["group"]))
            for g in t["groups"]]


def task_optim(rank: int, world: int) -> dict:
    recipe0 = optim_recipe(1)
    processor = load_processor(recipe0.model)
    _use(processor)
    samples = Samples(recipe0, processor)
    base = load_model(recipe0.model, "fp32")
    # one micro-batch per rank, images on both: every parameter the model uses gets a gradient
    rows = {0: [0, 4, 3, 28], 1: [2, 22, 26]}
    batch = pack([samples.one[i] for i in rows[rank % 2]])
    _, grads = reference_grad(copy.deepcopy(base), [samples.one[i] for i in rows[0] + rows[1]], "token")
    dead = sorted(n for n, g in grads.items() if not g.any())  # e.g. CLIP's post_layernorm: unused
    out = {"world": world, "groups": [], "freeze": [], "dead": dead}
    t0 = time.perf_counter()
    for stage in STAGES:
        recipe = optim_recipe(stage)
        eng, model, _ = build(base, recipe, world)
        got0 = ds_groups(eng, model)
        r = train_step(eng, [batch], recipe, world)
        got1 = ds_groups(eng, model)
        # after k optimizer steps the groups hold the lr of step k + 1 (lr-table counts from 1)
        out["groups"].append({"stage": stage, "ds_step0": got0, "table_step0": table_groups(recipe, 1),
                              "ds_step1": got1, "table_step1": table_groups(recipe, 2),
                              "skipped": r.skipped})
        del eng
    for override, stage, expect in FREEZE_CASES:
        recipe = optim_recipe(stage, [override])
        eng, model, rows_ = build(base, recipe, world)
        before = {n: p.detach().clone() for n, p in base.named_parameters()}
        req = {n: p.requires_grad for n, p in model.named_parameters()}
        r = train_step(eng, [batch], recipe, world)
        after = full_params(eng, model)
        names = list(before)
        out["freeze"].append({
            "override": override, "stage": stage, "skipped": r.skipped,
            "expected_frozen": sorted(n for n in names if expect(n)),
            "planned_frozen": sorted(row.name for row in rows_ if row.frozen),
            "requires_grad_false": sorted(n for n in names if not req[n]),
            "unchanged": sorted(n for n in names if torch.equal(before[n], after[n])),
            "all": names})
        del eng
    out["timing"] = {"total_s": time.perf_counter() - t0}
    return out


# ------------------------------------------------------------------------------------------
# Task: e2e (issue 5, end to end)

E2E_STEPS = 3
E2E_GLOBAL_ACC = 4  # micro-batches per optimizer step over all ranks


def task_e2e(rank: int, world: int, out: Path, extra: list[str]) -> dict:
    from vlmft.cli import app

    acc = E2E_GLOBAL_ACC // world
    dest = out / "e2e"
    t = time.perf_counter()
    app(["train", str(DEMO), f"output_dir={dest}", f"train.max_steps={E2E_STEPS}",
         f"train.grad_accum_steps={acc}", "train.micro_batch_size=1", "engine.precision=fp32",
         "optim.eps=1.0", "optim.weight_decay=0.0", "checkpoint.every_steps=0", *extra],
        standalone_mode=False)
    return {"world": world, "acc": acc, "output_dir": str(dest), "seconds": time.perf_counter() - t}


# ------------------------------------------------------------------------------------------
# Task: nonfinite (issue 11, the finite guard)

NAN_STEP = 1  # 0-based: the second optimizer step


def task_nonfinite(rank: int, world: int, out: Path, extra: list[str]) -> dict:
    """Two runs of ``vlmft train`` (the Typer command) for 4 steps: in ``nan`` rank 1's hidden
    states are NaN in step NAN_STEP (so its loss and the step's gradient are); in ``empty`` every
    label of that step is masked on every rank (the step is skipped as empty). The test compares
    their final weights and metrics."""
    from vlmft import forward
    from vlmft import train as trainmod
    from vlmft.cli import app

    real_step, real_hidden = trainmod.train_step, forward.hidden_states
    state = {"calls": 0, "mode": None, "nan": False}

    def stepper(eng, batches, recipe, world_, stop=False, **kw):
        k = state["calls"]
        state["calls"] += 1
        if k == NAN_STEP and state["mode"] == "empty":
            batches = [dict(b, labels=torch.full_like(b["labels"], X)) for b in batches]
        state["nan"] = k == NAN_STEP and state["mode"] == "nan" and rank == 1
        return real_step(eng, batches, recipe, world_, stop, **kw)

    def hidden(*args, **kwargs):
        h = real_hidden(*args, **kwargs)
        return h * float("nan") if state["nan"] else h

    trainmod.train_step, forward.hidden_states = stepper, hidden
    runs = {}
    try:
        for mode in ("nan", "empty"):
            state.update(calls=0, mode=mode, nan=False)
            dest = out / f"nonfinite_{mode}"
            app(["train", str(DEMO), f"output_dir={dest}", "train.max_steps=4", "train.grad_accum_steps=2",
                 "engine.precision=fp32", "checkpoint.every_steps=0", *extra], standalone_mode=False)
            runs[mode] = str(dest)
    finally:
        trainmod.train_step, forward.hidden_states = real_step, real_hidden
    return {"runs": runs, "nan_step": NAN_STEP + 1}


# ------------------------------------------------------------------------------------------
# Task: eval (issue 13, evaluation)


def task_eval(rank: int, world: int, out: Path, extra: list[str]) -> dict:
    """vlmft.eval.evaluate (what `vlmft eval` runs) on the demo's held-out set split in two by
    the ``extra`` overrides, packed 2 packs a micro-batch, for every reduction; the test compares
    each figure with one rank's."""
    from vlmft.eval import evaluate

    results = {}
    for reduction in REDUCTIONS:
        recipe = load(DEMO, [*extra, f"loss.reduction={reduction}", "train.micro_batch_size=2"])
        r = evaluate(recipe, None, generate=False)
        results[reduction] = {"datasets": r["datasets"], "overall": r["overall"],
                              "samples_per_rank": r["samples_per_rank"]}
    return results




# Task: lora_grad (issue 14)

LORA = ["lora.enabled=true", "lora.modules_to_save=[projector]"]


def task_lora_grad(rank: int, world: int) -> dict:
    """``grad`` with LoRA: the demo model wrapped (adapters on the language model, the projector
    trained fully), its adapters set to random values first (B = 0 would leave A without a
    gradient). For every reduction x ZeRO 2, 3 x this world's accumulations, one optimizer step:
    the update of every trained parameter (/ -1e6, as in ``grad``) against the gradient of L in
    plain torch on the same wrapped model, every sample alone; the frozen ones must not move."""
    from vlmft import lora

    recipe0 = recipe_for(2, 1, extra=LORA)
    processor = load_processor(recipe0.model)
    _use(processor)
    samples = Samples(recipe0, processor)
    base = lora.apply(load_model(recipe0.model, "fp32"), recipe0.lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, q in base.named_parameters():
            if ".lora_" in n:
                q.copy_(torch.randn_like(q) * 0.05)
    trained = [n for n, q in base.named_parameters() if q.requires_grad]
    parts = step_parts(samples)
    before = {n: q.detach().clone() for n, q in base.named_parameters()}
    refs = {}
    if rank == 0:
        ref_model = copy.deepcopy(base)
        for red in REDUCTIONS:
            loss, grads = reference_grad(ref_model, parts, red)
            refs[red] = (loss, {n: grads[n] for n in trained})
    out = {"world": world, "trained": len(trained), "cases": []}
    for stage in (2, 3):
        for acc in [a for (w, a) in SPLITS if w == world]:
            for red in REDUCTIONS:
                recipe = recipe_for(stage, acc, red, extra=LORA)
                eng, model, _ = build(base, recipe, world)
                r = train_step(eng, rank_batches(parts, world, acc, rank), recipe, world)
                after = full_params(eng, model)
                case = {"stage": stage, "acc": acc, "reduction": red, "loss": r.loss, "skipped": r.skipped,
                        "frozen_moved": sorted(n for n in before if n not in trained
                                               and not torch.equal(before[n], after[n]))}
                if rank == 0:
                    ref_loss, ref = refs[red]
                    case.update(compare({n: (before[n] - after[n]) / K for n in trained}, ref), ref_loss=ref_loss)
                out["cases"].append(case)
                del eng
    return out


TASKS = {"e2e": task_e2e, "grad": task_grad, "optim": task_optim, "nonfinite": task_nonfinite,
         "lora_grad": task_lora_grad, "eval": task_eval}


def main(argv: list[str]) -> None:
    tasks, out = argv[1].split(","), Path(argv[2]).resolve()
    os.chdir(ROOT)  # recipes name paths relative to the repository root
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup_environment()
    rank, world = _init_distributed()
    results = {}
    for task in tasks:
        torch.manual_seed(0)
        t = time.perf_counter()
        fn = TASKS[task]
        results[task] = fn(rank, world, out, argv[3:]) if task in ("e2e", "nonfinite", "eval") else fn(rank, world)
        results[task]["task_s"] = time.perf_counter() - t
    results["wall_s"] = time.perf_counter() - t0
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
