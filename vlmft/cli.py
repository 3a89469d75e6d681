"""vlmft command line: parse, call the library, render (rich) or serialize (--json).

Heavy imports (torch, transformers, deepspeed) happen inside the commands, after the recipe has
been validated, so ``--help`` and a bad recipe answer at once. A mistake the user can fix (a
recipe, a flag, data, a model folder or hub id, a folder that cannot be written) ends in one
``error`` line and exit code 2; any other exception keeps its traceback (a bug to report).

Help is Typer's plain (click) layout: its rich layout shows a flag as ``--json <bool>``, as if
it took a value.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from . import recipe as recipes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Fine-tune vision-language models from YAML recipes.")
err = Console(stderr=True)
out = Console()

RECIPE = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OVERRIDES = typer.Argument(None, help="key.path=value overrides, e.g. train.max_steps=10 or "
                           "data.datasets.0.path=train.jsonl", show_default=False)


def _load(path: str, overrides: Optional[list[str]]) -> recipes.Recipe:
    try:
        return recipes.load(path, overrides or [])
    except recipes.RecipeError as exc:
        _fail(exc.errors)


def _fail(lines: list[str]):
    from rich.markup import escape

    for line in lines:
        err.print("[red]error[/red] " + escape(line), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _note(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        err.print(line, highlight=False, soft_wrap=True, markup=False)


def _set_up(model: str, **kw) -> None:
    """vlmft/runtime.py's set-up for a command that loads ``model`` (its keywords: ``threads``,
    ``distributed``); its notes go to stderr."""
    from . import runtime

    for note in runtime.setup(model, **kw):
        _note(note)


@contextlib.contextmanager
def _user_errors(model: str = ""):
    """Errors the user can fix -> one line, exit 2: recipe and data problems (RecipeError,
    ValueError) and, through vlmft/hub.py, hub, network, missing-file and permission errors."""
    try:
        yield
    except (recipes.RecipeError, ValueError) as exc:  # found later: bad data, a bad --resume, ...
        from . import hub

        msg = hub.explain(exc, model)  # huggingface_hub's errors include ValueErrors
        _fail([msg] if msg else (getattr(exc, "errors", None) or str(exc).splitlines()))
    except typer.Exit:
        raise
    except Exception as exc:
        from . import hub

        msg = hub.explain(exc, model)
        if msg is None:
            raise
        _fail([msg])


def _version(value: bool):
    if value:
        print(f"vlmft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print vlmft's version and exit."),
):
    """Fine-tune vision-language models from YAML recipes."""


@app.command()
def train(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, help="'auto' (latest checkpoint in output_dir) or a checkpoint folder."),
    force: bool = typer.Option(False, "--force", help="Resume even if the recipe changed in ways that break exactness."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in output_dir "
                                   "(its checkpoints, final model and metrics are deleted)."),
):
    """Train on one process, or one per GPU under torchrun / the deepspeed launcher."""
    from . import run_dir

    r = _load(recipe, overrides)
    refusal = run_dir.refusal(r.output_dir, resume, overwrite) or run_dir.create(r.output_dir)
    if refusal:
        _fail([refusal])
    with _user_errors(r.model.name_or_path):
        _set_up(r.model.name_or_path, threads=True, distributed=True)
        note = run_dir.resume_note(r.output_dir, resume)
        if note:
            _note(note)
        if overwrite and os.environ.get("RANK", "0") == "0":
            removed = run_dir.clear(r.output_dir)
            if removed:
                _note(f"vlmft: --overwrite: removed {', '.join(removed)} from {r.output_dir}")
        from .train import train as run

        summary = run(r, resume=resume, force=force)
    if summary.rank == 0 and not summary.preempted:
        err.print(f"done: {summary.steps} steps, final model in {summary.final}", soft_wrap=True, highlight=False)


@app.command("lr-table")
def lr_table(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    step: int = typer.Option(1, help="Show the learning rates at this optimizer step (1 = the first, as in training's logs)."),
    by: str = typer.Option("param", help="param | layer | group"),
    wide: bool = typer.Option(False, "--wide", help="Every column, names in full (wider than the terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Print {'rows': [...], 'totals': {...}}."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV rows."),
):
    """Every parameter's group, layer id, LR, weight decay and frozen state, without weights."""
    if as_json + as_csv + wide > 1:
        _fail(["--json, --csv and --wide choose the output format; give one of them"])
    if by not in ("param", "layer", "group"):
        _fail([f"--by: '{by}' is not one of param, layer, group"])
    if step < 1:
        _fail([f"--step: steps count from 1 (the first optimizer step), got {step}"])
    r = _load(recipe, overrides)
    from . import lr_table as lt

    with _user_errors(r.model.name_or_path):
        _set_up(r.model.name_or_path)
        table = lt.lr_table(r, step=step, by=by)
    if as_json:
        print(json.dumps(table, default=str))
    elif as_csv:
        sys.stdout.write(lt.to_csv(table))
    else:
        rendered = lt.render(table, width=out.width, wide=wide)
        console = Console(width=lt.wide_width(rendered)) if wide else out
        console.print(rendered)


@app.command("pack-stats")
def pack_stats(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    data: Optional[str] = typer.Option(None, help="Replace the recipe's datasets by this JSONL, JSON array or meta JSON."),
    limit: int = typer.Option(0, help="Read at most N records per dataset (0 = all)."),
    strategy: Optional[str] = typer.Option(None, help="best_fit | internvl | next_fit (default: the recipe's)."),
    world_size: int = typer.Option(8, help="Ranks to report the per-rank compute balance for."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """How well the data packs: fill, padding, packs vs the lower bound, what was dropped."""
    ov = list(overrides or [])
    if data:
        ov.append(f"data.datasets=[{{path: '{data}'}}]")
    if strategy:
        ov.append(f"data.packing.strategy={strategy}")
    if world_size < 1:
        _fail([f"--world-size: must be >= 1, got {world_size}"])
    r = _load(recipe, ov)
    from . import pack_stats as ps

    with _user_errors(r.model.name_or_path):
        _set_up(r.model.name_or_path)
        stats = ps.pack_stats(r, limit=limit, progress=not as_json and err.is_terminal,
                              world_size=world_size)
    if as_json:
        print(json.dumps(stats))
    else:
        out.print(ps.render(stats))


@app.command()
def check(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    samples: int = typer.Option(16, help="How many usable samples to check (the first ones)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Prove packing is exact on the recipe's model: packed logits vs each sample alone, plan ==
    encode, gradients reach every tower. Exit code 1 when a check fails."""
    r = _load(recipe, overrides)
    if samples < 1:
        _fail([f"--samples: must be >= 1, got {samples}"])
    from . import check as ck

    with _user_errors(r.model.name_or_path):  # RecipeError and UnsupportedModel included
        _set_up(r.model.name_or_path, threads=True)
        report = ck.check(r, samples=samples)
    if as_json:
        print(json.dumps(report))
    else:
        out.print(ck.render(report))
    if not ck.passed(report):
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    model: Optional[str] = typer.Option(None, help="A run's final/ (any HF folder) or checkpoints/stepN; "
                                        "default: the recipe's model (before training)."),
    data: Optional[str] = typer.Option(None, help="Evaluate this JSONL, JSON array or meta JSON instead of data.eval."),
    no_generate: bool = typer.Option(False, "--no-generate", help="Loss and visual reliance only: no answers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Held-out loss per eval set, the loss with blank images (visual reliance) and the exact
    match of greedy answers, on one model; under torchrun the ranks share the work."""
    from . import eval as ev

    r = _load(recipe, list(overrides or []) + (ev.data_override(data) if data else []))
    if not r.data.eval:
        _fail(["data.eval: no evaluation datasets; add data.eval to the recipe or pass --data FILE"])
    with _user_errors(model or r.model.name_or_path):
        _set_up(r.model.name_or_path, threads=True, distributed=True)
        result = ev.evaluate(r, model, generate=not no_generate)
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        print(json.dumps(result))
        return
    for line in result["drop_table"]:
        _note(line)
    out.print(ev.render(result), soft_wrap=True)


@app.command()
def plot(
    run: str = typer.Argument(..., help="A run's output_dir, e.g. runs/demo.", show_default=False),
    out: Optional[str] = typer.Option(None, help="PNG to write (default: RUN/curves.png)."),
):
    """Train and eval loss per dataset and the learning rate, as a PNG, from metrics.jsonl."""
    from . import plot as plots

    try:
        path = plots.plot(run, out)
    except ValueError as exc:
        _fail([str(exc)])
    err.print(f"wrote {path}", soft_wrap=True, highlight=False)


@app.command()
def chat(
    model: str = typer.Argument(..., help="A model folder: runs/NAME/final, or any supported checkpoint.", show_default=False),
    question: str = typer.Argument(..., help="The question.", show_default=False),
    image: Optional[list[str]] = typer.Option(None, "--image", help="An image file (repeat for several)."),
    max_new_tokens: int = typer.Option(64, help="Most tokens of the answer."),
):
    """Answer one question about images with a trained model, greedily, through the same chat
    template and processor as training, stopping at the end of the assistant's turn."""
    from pathlib import Path

    from .validation import model_problems

    missing = [p for p in image or [] if not Path(p).is_file()]
    if model_problems(model) or missing:  # the recipe's rule for a model path: a folder or 'org/name'
        _fail(model_problems(model) + [f"--image: '{p}' not found" for p in missing[:1]])
    with _user_errors(model):
        _set_up(model, threads=True)
        from .generate import ask

        print(ask(model, question, image or [], max_new_tokens))


@app.command("recipe")
def recipe_schema(
    section: Optional[str] = typer.Argument(None, help="A section or key, e.g. optim or data.packing.", show_default=False),
    init: bool = typer.Option(False, "--init", help="Print a commented starting recipe instead: vlmft recipe --init > my.yaml"),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
):
    """Every recipe key with its type, default and help text (or a starting recipe with --init)."""
    from . import recipe_doc

    if init and (section or as_json):
        _fail(["--init prints the whole starting recipe; give it alone"])
    if init:
        sys.stdout.write(recipe_doc.starter())
        return
    try:
        rows = recipe_doc.schema(section)
    except ValueError as exc:
        _fail([str(exc)])
    if as_json:
        print(json.dumps(rows))
        return
    import textwrap

    width = max(60, min(out.width, 100))
    for row in rows:
        kind = row["type"] + ("" if row["default"] is None else f" = {row['default']}")
        if row["choices"]:
            kind += f"  ({' | '.join(map(str, row['choices']))})"
        print(f"{row['key']}: {kind}")
        print(textwrap.fill(row["help"], width=width, initial_indent="    ", subsequent_indent="    "))


def main() -> None:
    """The console script: the command, then a clean exit from the process group (if the
    command joined one), so gloo's threads do not die with the interpreter."""
    try:
        app()
    finally:
        if "torch.distributed" in sys.modules:
            from .distributed import shutdown

            shutdown()
