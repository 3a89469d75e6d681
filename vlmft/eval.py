"""Evaluation on the recipe's held-out sets (data.eval), during training and by ``vlmft eval``.

    Evaluator(recipe, processor, training dataset names, rank, world)   plans data.eval once
      .run(module, model, label)  ->  {"datasets": {NAME: {...}}, "overall": {...}, ...}
         loss pass          eval_loss.py: per-set loss normalized like training, all ranks, no
                            gradient, packed like training; the same with blank images
         answer pass        eval_answers.py (eval.generate): greedy answers to the short-answer
                            samples, exact match, predictions in {output_dir}/eval/LABEL/NAME.jsonl
      .metrics(result)  ->  eval/NAME/loss, .../loss_blank_images, .../visual_gap, .../exact_match
      .measured(result) ->  held-out loss per training dataset (data.adaptive)

Training calls it every ``eval.every_steps`` and after the last step (label ``stepN``);
:func:`evaluate` is ``vlmft eval``: one model (base, final/ or a checkpoint), any number of ranks.
"""

from __future__ import annotations

from pathlib import Path

from . import eval_answers, eval_data, eval_loss
from .data.drops import per_dataset
from .data.stream import Materializer
from .recipe import Recipe

FIELDS = ("loss", "loss_blank_images", "visual_gap", "exact_match")


class Evaluator:
    def __init__(self, recipe: Recipe, processor, train_names: list[str], rank: int, world: int):
        self.cfg, self.rank, self.world = recipe.eval, rank, world
        self.reduction, self.chunk_size = recipe.loss.reduction, recipe.loss.chunk_size
        self.micro_batch = recipe.train.micro_batch_size
        self.max_tiles = recipe.data.max_tiles_per_image
        self.out = Path(recipe.output_dir) / "eval"
        self.processor = processor
        self.data = eval_data.build(recipe, processor, train_names)
        self.mat = Materializer(eval_data.eval_recipe(recipe), self.data.catalog, processor)
        self._questions = None
        self._sums = None

    def due(self, step: int, last_step: int) -> bool:
        every = self.cfg.every_steps
        return step == last_step or bool(every and step % every == 0)

    def questions(self) -> list:
        if self._questions is None:
            self._questions = eval_answers.questions(self.data, self.processor, self.cfg.max_new_tokens,
                                                     self.cfg.max_generate_samples, self.max_tiles)
        return self._questions

    def run(self, module, model, label: str, *, zero3: bool = False, device=None, generate: bool | None = None) -> dict:
        """Evaluate on every rank (all must call it). ``module``: the forward.LossModule (or the
        engine wrapping it) that training uses; ``model``: its HF model, for generation."""
        was = module.training
        module.eval()
        try:
            blank = self.cfg.visual_reliance
            sums = eval_loss.loss_sums(module, self.data, self.mat, self.rank, self.world, self.micro_batch,
                                       self.reduction, self.chunk_size, blank, device)
        finally:
            module.train(was)
        self._sums = sums
        per, overall = eval_loss.figures(sums, self.data.names, blank)
        dropped = per_dataset(self.data.catalog)
        for d, name in enumerate(self.data.names):
            per[name].update(measures=self.data.measures[d], image_samples=self._image_samples(d),
                             dropped=dropped[d]["dropped"],
                             dropped_reasons={k: v["count"] for k, v in dropped[d]["reasons"].items()})
        result = {"label": label, "datasets": per, "overall": overall,
                  "samples_per_rank": self._samples_per_rank()}
        if self.cfg.generate if generate is None else generate:
            qs = self.questions()
            with eval_answers.generation_model(model, zero3) as gm:
                preds = eval_answers.answer_all(gm, self.processor, qs, self.rank, self.world, self.cfg.max_new_tokens)
            folder = self.out / label if self.rank == 0 else None
            scores = eval_answers.score(self.data, qs, preds, folder)
            for name, s in scores.items():
                per[name].update(s)
            answered = sum(s["answered"] for s in scores.values())
            hits = sum(s["exact_match"] * s["answered"] for s in scores.values() if s["answered"])
            overall.update(exact_match=hits / answered if answered else None, answered=answered)
            result["answers_per_rank"] = [len(range(r, len(qs), self.world)) for r in range(self.world)]
            result["predictions"] = str(self.out / label)
        return result

    def _image_samples(self, d: int) -> int:
        return sum(1 for s in self.data.catalog.samples if s.dataset == d and s.num_images)

    def _samples_per_rank(self) -> list[int]:
        packs = self.data.packs
        return [sum(len(p) for p in packs[r::self.world]) for r in range(self.world)]

    def measured(self) -> dict[str, float]:
        """The last run's held-out loss per measured training dataset (sets measuring the same
        one pooled: their S over their W)."""
        pooled: dict[str, list[float]] = {}
        for d, train in enumerate(self.data.measures):
            if train is not None:
                s = pooled.setdefault(train, [0.0, 0.0])
                s[0] += float(self._sums[0, d])
                s[1] += float(self._sums[1, d])
        return {k: s / w for k, (s, w) in pooled.items() if w > 0}


def metrics(result: dict) -> dict:
    """Flat metrics.jsonl / TensorBoard keys of a run's result."""
    row = {f"eval/{k}": v for k, v in result["overall"].items() if k in FIELDS}
    for name, r in result["datasets"].items():
        row.update({f"eval/{name}/{k}": v for k, v in r.items() if k in FIELDS})
    row["eval/samples_per_rank"] = result["samples_per_rank"]
    if "answers_per_rank" in result:
        row["eval/answers_per_rank"] = result["answers_per_rank"]
    return row


def summary(result: dict) -> str:
    """One line per eval set for the training log."""
    lines = []
    for name, r in result["datasets"].items():
        parts = [f"loss {_f(r['loss'])}"]
        if "visual_gap" in r and r["image_samples"]:
            parts.append(f"blank images {_f(r['loss_blank_images'])} (gap {_f(r['visual_gap'])})")
        if "exact_match" in r:
            parts.append(f"exact match {_f(r['exact_match'])} of {r['answered']}")
        lines.append(f"vlmft: eval {result['label']} {name}: " + ", ".join(parts) + _bad(r))
    return "\n".join(lines)


def _bad(r: dict) -> str:
    """What was not evaluated: planning drops and samples that failed to load (never silent)."""
    out = []
    if r["dropped"]:
        out.append(f"{r['dropped']} dropped while planning ("
                   + ", ".join(f"{k} {v}" for k, v in r["dropped_reasons"].items()) + ")")
    if r["bad_samples"]:
        out.append(f"{r['bad_samples']} failed to load")
    if r.get("answer_errors"):
        out.append(f"{r['answer_errors']} could not be answered")
    return f"; not evaluated: {', '.join(out)}" if out else ""


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def evaluate(recipe: Recipe, model_path: str | None = None, generate: bool = True) -> dict:
    """``vlmft eval``: the recipe's eval sets on one model (None: the recipe's base model),
    on this process or every rank of a torchrun launch (each holds the whole model)."""
    import torch

    from .data.sources import expand
    from .distributed import init
    from .eval_model import load, resolve
    from .forward import LossModule
    from .model import load_family

    rank, world = init()
    cfg, ckpt, label = resolve(recipe.model, model_path)
    _, fam, processor = load_family(cfg, recipe.data)  # what the family cannot do: refused, as in training
    ev = Evaluator(recipe, processor, [d.name for d in expand(recipe.data.datasets)], rank, world)
    model = load(cfg, ckpt)
    if torch.cuda.is_available():
        model = model.cuda()
    module = LossModule(model, fam, recipe.loss.chunk_size)
    device = next(model.parameters()).device
    result = ev.run(module, model, label, device=device, generate=generate)
    result.update(model=str(model_path or recipe.model.name_or_path),
                  drop_table=eval_data.drop_lines(ev.data.catalog))
    return result


def data_override(path: str) -> list[str]:
    """``vlmft eval --data FILE``: the recipe overrides that make FILE the only eval set
    (data.adaptive, which needs sets measuring the training data, is switched off)."""
    from .recipe import DataConfig

    d = DataConfig()
    return [f"data.eval=[{{path: '{path}'}}]", "data.adaptive=none", f"data.adaptive_floor={d.adaptive_floor}",
            f"data.adaptive_cap={d.adaptive_cap}", f"data.adaptive_smoothing={d.adaptive_smoothing}"]


def render(result: dict):
    """The rich table ``vlmft eval`` prints."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table()
    for col in ("dataset", "samples", "loss", "blank-image loss", "visual gap", "exact match"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    notes = [f"{name}{_bad(r)}" for name, r in result["datasets"].items() if _bad(r)]
    if notes:
        t.caption, t.caption_justify = "\n".join(notes), "left"
    rows = list(result["datasets"].items())
    rows += [("all", result["overall"])] if len(rows) > 1 else []
    for name, r in rows:
        em = ""
        if r.get("exact_match") is not None:
            em = f"{r['exact_match']:.3f} ({round(r['exact_match'] * r['answered'])}/{r['answered']})"
        t.add_row(name, str(r["samples"]), _f(r["loss"]), _f(r.get("loss_blank_images")),
                  _f(r.get("visual_gap")), em, end_section=len(rows) > 1 and (name, r) == rows[-2])
    return Group(Text(f"vlmft eval: {result['model']} ({result['label']})"), t)
