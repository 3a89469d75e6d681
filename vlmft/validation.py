"""Recipe validation: the checks on the values of a well-typed recipe.

Every problem is collected (never the first only) as ``key.path: message``; the caller
(vlmft/recipe.py ``load``) runs the type walk first (vlmft/type_check.py), then
:func:`semantic_checks`, adds file lines and raises one RecipeError. This module works on the
loaded recipe object it is handed; it imports neither torch nor vlmft.recipe nor
vlmft.recipe_schema (recipe.py imports it, never the other way round). :func:`semantic_checks`
runs one check function per part of the recipe.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def _balance_checks(d, e: list[str]) -> None:
    """InternVL's packing knobs and the balance options (data.packing.*, data.step_balance,
    data.adaptive*): what would do nothing is refused."""
    p = d.packing
    if p.strict_mode:
        e.append("data.packing.strict_mode: not supported: InternVL's strict_mode pads packs with "
                 "zero images and changes no grouping; vlmft never pads tiles; remove it")
    if p.allow_overflow and p.strategy != "internvl":
        e.append(f"data.packing.allow_overflow: only used with data.packing.strategy=internvl "
                 f"(strategy is {p.strategy})")
    if p.balance_compute and (p.strategy != "best_fit" or not p.enabled):
        e.append("data.packing.balance_compute: needs data.packing.strategy=best_fit and packing enabled")
    if p.balance_compute and d.step_balance != "none":
        e.append("data.packing.balance_compute: not combined with data.step_balance (both decide "
                 "which packs share a step); set one of them")
    if not 0.0 < d.adaptive_floor <= 1.0:
        e.append(f"data.adaptive_floor: must be in (0, 1] (weights average 1), got {d.adaptive_floor}")
    if d.adaptive_cap < 1.0:
        e.append(f"data.adaptive_cap: must be >= 1 (weights average 1), got {d.adaptive_cap}")
    if not 0.0 <= d.adaptive_smoothing < 1.0:
        e.append(f"data.adaptive_smoothing: must be in [0, 1), got {d.adaptive_smoothing}")
    if d.adaptive == "none":
        for k, default in (("adaptive_floor", 0.5), ("adaptive_cap", 2.0), ("adaptive_smoothing", 0.5)):
            if getattr(d, k) != default:
                e.append(f"data.{k}: only used with data.adaptive=progress or difficulty")


EVAL_DEFAULTS = {"every_steps": 0, "visual_reliance": True, "generate": False, "max_new_tokens": 32,
                 "max_generate_samples": 0}
WANDB_DEFAULTS = {"wandb_project": "vlmft", "wandb_run_name": "", "wandb_mode": "online"}


def _is_meta(path: Path) -> bool:
    """An InternVL meta JSON (a .json file holding an object): its dataset names are inside."""
    if path.suffix != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1] == b"{"


def entry_names(entries) -> list[str] | None:
    """The names data.datasets / data.eval entries give their datasets (name, else the file's
    stem); None when an entry is a meta JSON (names known once it is read, at build time)."""
    names = []
    for d in entries:
        p = Path(d.path).expanduser()
        if _is_meta(p):
            return None
        names.append(d.name or p.stem)
    return names


def _eval_checks(r, e: list[str]) -> None:
    """data.eval, the eval section, data.adaptive's needs, the wandb keys."""
    d, ev = r.data, r.eval
    for i, x in enumerate(d.eval):
        key = f"data.eval[{i}]"
        _entry_files(e, key, x)
    if not d.eval:
        e += [f"eval.{k}: only used with evaluation datasets (data.eval); add data.eval or remove it"
              for k, v in EVAL_DEFAULTS.items() if getattr(ev, k) != v]
    if ev.every_steps < 0:
        e.append(f"eval.every_steps: must be >= 0, got {ev.every_steps}")
    if ev.max_new_tokens < 1:
        e.append(f"eval.max_new_tokens: must be > 0, got {ev.max_new_tokens}")
    if ev.max_generate_samples < 0:
        e.append(f"eval.max_generate_samples: must be >= 0, got {ev.max_generate_samples}")
    if not r.log.wandb:
        e += [f"log.{k}: only used with log.wandb=true" for k, v in WANDB_DEFAULTS.items()
              if getattr(r.log, k) != v]
    elif importlib.util.find_spec("wandb") is None:
        e.append("log.wandb: the wandb package is not installed; pip install 'vlmft[wandb]' or set log.wandb=false")
    train = entry_names(d.datasets) if all(x.path for x in d.datasets) else None
    evals = entry_names(d.eval) if all(x.path for x in d.eval) else None
    if evals is not None and len(set(evals)) < len(evals):
        e.append(f"data.eval: two sets share a name ({', '.join(evals)}); give each a name")
    if d.adaptive == "none":
        return
    if train is not None and evals is not None:
        for i, (x, n) in enumerate(zip(d.eval, evals)):
            if x.measures and x.measures not in train:
                e.append(f"data.eval[{i}].measures: '{x.measures}' is not a training dataset "
                         f"(data.datasets: {', '.join(train)})")
    if not d.eval:
        e.append(f"data.adaptive: {d.adaptive} needs evaluation datasets: add data.eval, a set "
                 "measuring each training dataset (measures: NAME)")
    elif ev.every_steps == 0:
        e.append("data.adaptive: the weights change at each evaluation; set eval.every_steps > 0")
    if train is not None and len(set(train)) < len(train):
        e.append(f"data.adaptive: training datasets share a name ({', '.join(train)}); give each a name")
    if d.eval and train is not None and evals is not None:
        measured = {x.measures or n for x, n in zip(d.eval, evals)}
        missing = [t for t in train if t not in measured]
        if missing:
            e.append(f"data.adaptive: no data.eval set measures {', '.join(missing)}; add one with "
                     f"measures: {missing[0]} (or name it {missing[0]})")


def _lora_checks(r, e: list[str]) -> None:
    """The lora section (vlmft/lora.py resolves the module globs later, on the model): ranges,
    and what would do nothing when LoRA is off."""
    lo = r.lora
    if not lo.enabled:
        for k, default in (("r", 8), ("alpha", 16.0), ("dropout", 0.0), ("rslora", False),
                           ("init", "default"), ("modules_to_save", []), ("quantize", "none")):
            if getattr(lo, k) != default:
                e.append(f"lora.{k}: only used with lora.enabled=true")
        t = lo.targets
        if (t.language, t.vision, t.projector) != (["linear"], [], []):
            e.append("lora.targets: only used with lora.enabled=true")
        return
    if lo.r < 1:
        e.append(f"lora.r: must be >= 1, got {lo.r}")
    elif lo.init == "orthogonal" and lo.r % 2:
        e.append(f"lora.init: orthogonal needs an even lora.r, got {lo.r}")
    if lo.alpha <= 0:
        e.append(f"lora.alpha: must be > 0, got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        e.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    t = lo.targets
    if not (t.language or t.vision or t.projector):
        e.append("lora.targets: no tower has targets; give e.g. lora.targets.language=[linear]")
    for tower in ("language", "vision", "projector"):
        for i, g in enumerate(getattr(t, tower)):
            if not g.strip():
                e.append(f"lora.targets.{tower}[{i}]: empty glob")
    if lo.quantize == "nf4":
        if r.engine.precision == "fp32":
            e.append("lora.quantize: nf4 computes in bf16 or fp16; set engine.precision=bf16")
        if r.engine.zero_stage == 3:
            e.append("lora.quantize: nf4 is supported with engine.zero_stage 0-2 (4-bit weights are "
                     "not partitioned); set engine.zero_stage=2")


def _entry_files(e: list[str], key: str, entry) -> None:
    """A dataset entry's file and image folder exist (data.datasets and data.eval alike)."""
    if not entry.path:
        e.append(f"{key}.path: required: a conversation JSONL or an InternVL meta JSON")
    elif not Path(entry.path).expanduser().is_file():
        e.append(f"{key}.path: file '{entry.path}' not found (relative paths are from {os.getcwd()})")
    if entry.image_root and not Path(entry.image_root).expanduser().is_dir():
        e.append(f"{key}.image_root: folder '{entry.image_root}' not found")


def _positive(e: list[str], key: str, v, allow_zero: bool = False) -> None:
    if v < 0 or (v == 0 and not allow_zero):
        e.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def semantic_checks(r) -> list[str]:
    """Checks on the values of a well-typed recipe (a vlmft.recipe.Recipe): ranges, files that
    must exist, a writable output_dir, combinations."""
    e = []
    e += model_problems(r.model.name_or_path)
    problem = output_dir_problem(r.output_dir)
    if problem:
        e.append(f"output_dir: {problem}")
    _dataset_checks(r.data.datasets, e)
    _packing_checks(r.data.packing, e)
    _balance_checks(r.data, e)
    _eval_checks(r, e)
    _data_checks(r.data, r.model.attn_implementation, e)
    _positive(e, "loss.chunk_size", r.loss.chunk_size)
    _optim_checks(r.optim, e)
    _train_checks(r.schedule, r.train, e)
    _engine_checks(r.engine, e)
    _lora_checks(r, e)
    _positive(e, "checkpoint.every_steps", r.checkpoint.every_steps, allow_zero=True)
    _positive(e, "checkpoint.keep_last", r.checkpoint.keep_last)
    _positive(e, "log.every_steps", r.log.every_steps)
    return e


def _dataset_checks(datasets, e: list[str]) -> None:
    """data.datasets: at least one, files and folders that exist, repeat_time and loss_weight."""
    if not datasets:
        e.append("data.datasets: at least one dataset is required, e.g. - path: data/train.jsonl")
    for i, d in enumerate(datasets):
        key = f"data.datasets[{i}]"
        _entry_files(e, key, d)
        _positive(e, f"{key}.repeat_time", d.repeat_time)
        _positive(e, f"{key}.loss_weight", d.loss_weight, allow_zero=True)


def _packing_checks(p, e: list[str]) -> None:
    """data.packing's sizes and min_active_tokens_ratio (its knobs: :func:`_balance_checks`)."""
    _positive(e, "data.packing.max_packed_tokens", p.max_packed_tokens)
    _positive(e, "data.packing.max_buffer_size", p.max_buffer_size)
    _positive(e, "data.packing.window", p.window)
    _positive(e, "data.packing.num_images_expected", p.num_images_expected, allow_zero=True)
    if not 0.0 <= p.min_active_tokens_ratio <= 1.0:
        e.append("data.packing.min_active_tokens_ratio: must be in [0, 1]")


def _data_checks(d, attn_implementation: str, e: list[str]) -> None:
    """The rest of data: the bad-sample limit, workers, packing with the attention kernel,
    prefetch, the mixture, the compute model."""
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        e.append("data.max_bad_fraction: must be in [0, 1]")
    if isinstance(d.num_workers, str) and d.num_workers != "auto":
        e.append(f"data.num_workers: expected a number of workers or auto, got {d.num_workers!r}")
    elif isinstance(d.num_workers, int):
        _positive(e, "data.num_workers", d.num_workers, allow_zero=True)
    if attn_implementation == "eager" and d.packing.enabled:
        e.append("model.attn_implementation: eager with packed rows builds a (heads, L, L) attention matrix "
                 "per layer and a dense L x L mask; use auto, sdpa or flex_attention (vlmft/attention.py), or "
                 "data.packing.enabled=false")
    _positive(e, "data.prefetch_steps", d.prefetch_steps)
    _mixture_checks(d, e)
    _positive(e, "data.round_size", d.round_size, allow_zero=True)
    _positive(e, "data.attention_cost_length", d.attention_cost_length)
    _positive(e, "data.tile_cost", d.tile_cost, allow_zero=True)
    _positive(e, "data.max_tiles_per_image", d.max_tiles_per_image, allow_zero=True)


def _mixture_checks(d, e: list[str]) -> None:
    """data.temperature*: positive, and only set where the mixture and schedule use them."""
    _positive(e, "data.temperature", d.temperature)
    _positive(e, "data.temperature_end", d.temperature_end)
    if d.mixture == "size":
        for k, v, default in (("temperature", d.temperature, 1.0),
                              ("temperature_schedule", d.temperature_schedule, "constant"),
                              ("temperature_end", d.temperature_end, 1.0)):
            if v != default:
                e.append(f"data.{k}: only used with data.mixture=temperature (mixture is size)")
    elif d.temperature_schedule == "constant" and d.temperature_end != 1.0:
        e.append("data.temperature_end: only used with data.temperature_schedule=linear")


def _optim_checks(o, e: list[str]) -> None:
    """The optim section: lr, weight decay, AdamW's betas and eps, layer decay, multipliers,
    frozen vision layers."""
    _positive(e, "optim.lr", o.lr)
    _positive(e, "optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive(e, "optim.eps", o.eps)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        e.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    for tower in ("vision", "language"):
        v = getattr(o.layer_decay, tower)
        if not 0.0 < v <= 1.0:
            e.append(f"optim.layer_decay.{tower}: must be in (0, 1], got {v}")
    for pat, mult in o.lr_multipliers.items():
        _positive(e, f"optim.lr_multipliers.{pat}", mult, allow_zero=True)
    _positive(e, "optim.freeze.vision_first_layers", o.freeze.vision_first_layers, allow_zero=True)
    _positive(e, "optim.freeze.vision_last_layers", o.freeze.vision_last_layers, allow_zero=True)


def _train_checks(s, t, e: list[str]) -> None:
    """The schedule and train sections: warmup, final LR, steps or epochs, batch sizes."""
    _positive(e, "schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        e.append("schedule.min_lr_ratio: must be in [0, 1]")
    _positive(e, "train.epochs", t.epochs, allow_zero=True)
    if t.epochs > 0 and t.max_steps > 0:
        e.append("train.epochs: set either train.max_steps or train.epochs, not both")
    elif not t.epochs > 0:
        _positive(e, "train.max_steps", t.max_steps)
    _positive(e, "train.micro_batch_size", t.micro_batch_size)
    _positive(e, "train.grad_accum_steps", t.grad_accum_steps)
    _positive(e, "train.max_nonfinite_steps", t.max_nonfinite_steps)


def _engine_checks(en, e: list[str]) -> None:
    """The engine section: clipping, offload with the ZeRO stage, and the DeepSpeed keys vlmft
    sets itself."""
    _positive(e, "engine.gradient_clipping", en.gradient_clipping, allow_zero=True)
    if en.offload_params and en.zero_stage != 3:
        e.append("engine.offload_params: needs engine.zero_stage=3")
    if en.offload_optimizer and en.zero_stage == 0:
        e.append("engine.offload_optimizer: needs engine.zero_stage >= 1")
    for k in ("optimizer", "scheduler"):
        if k in en.deepspeed:
            e.append(f"engine.deepspeed.{k}: vlmft builds the {k} itself (parameter groups with "
                     f"no-decay and layer-wise LR); remove this block and use optim.* / schedule.*")
    if "stage" in (en.deepspeed.get("zero_optimization") or {}):
        e.append("engine.deepspeed.zero_optimization.stage: set by vlmft from engine.zero_stage; remove it "
                 "and use engine.zero_stage")
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if k in en.deepspeed:
            e.append(f"engine.deepspeed.{k}: set by vlmft from train.*; remove it and use "
                     "train.micro_batch_size / train.grad_accum_steps")


def model_problems(name: str) -> list[str]:
    """model.name_or_path: a hub id 'org/name', or a folder that exists and holds config.json."""
    folder = Path(name).expanduser()
    if not name:
        return ["model.name_or_path: required: a local model folder or a hub id"]
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_local and not folder.is_dir():
        return [f"model.name_or_path: folder '{name}' not found (relative paths are from "
                f"{os.getcwd()}); give an existing folder or a hub id like 'org/name'"]
    if folder.is_dir() and not (folder / "config.json").is_file():
        return [f"model.name_or_path: folder '{name}' has no config.json; give the folder of an "
                "HF model (from save_pretrained, or downloaded with `hf download ORG/NAME`)"]
    return []


def output_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be created or written (no file is written to find out), else None."""
    if not path:
        return "required: the folder for metrics, checkpoints and the final model"
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"'{path}' exists and is not a folder; choose another output_dir"
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        return f"'{path}' cannot be created: '{q}' is a file; choose another output_dir"
    if not os.access(q, os.W_OK | os.X_OK):
        return (f"'{path}' cannot be written: no write permission in '{q}'; choose another "
                "output_dir or fix the folder's permissions")
    return None
