"""vlmft command line: parse, call the library, render (rich) or serialize (--json).

Heavy imports (torch, transformers, deepspeed) happen inside the commands, after the recipe has
been validated, so ``--help`` and a bad recipe answer at once.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console

from . import recipe as recipes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune vision-language models from YAML recipes.")
err = Console(stderr=True)
out = Console()

RECIPE = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OVERRIDES = typer.Argument(None, help="key.path=value overrides, e.g. train.max_steps=10", show_default=False)


def _load(path: str, overrides: Optional[list[str]]) -> recipes.Recipe:
    try:
        return recipes.load(path, overrides or [])
    except recipes.RecipeError as exc:
        _fail(exc.errors)


def _fail(lines: list[str]):
    for line in lines:
        err.print(f"[red]error[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, help="'auto' (latest checkpoint in output_dir) or a checkpoint folder."),
    force: bool = typer.Option(False, help="Resume even if the recipe changed in ways that break exactness."),
):
    """Train on one process, or one per GPU under torchrun / the deepspeed launcher."""
    r = _load(recipe, overrides)
    from .distributed import setup_environment
    from .train import train as run

    setup_environment()

    try:
        summary = run(r, resume=resume, force=force)
    except (recipes.RecipeError, ValueError) as exc:  # found later: bad data, a bad --resume, ...
        _fail(getattr(exc, "errors", None) or str(exc).splitlines())
    if summary.rank == 0 and not summary.preempted:
        err.print(f"done: {summary.steps} steps, final model in {summary.final}", soft_wrap=True, highlight=False)


@app.command("lr-table")
def lr_table(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    step: int = typer.Option(0, help="Show the learning rates at this optimizer step."),
    by: str = typer.Option("param", help="param | layer | group"),
    as_json: bool = typer.Option(False, "--json", help="Print {'rows': [...], 'totals': {...}}."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV rows."),
):
    """Every parameter's group, layer id, LR, weight decay and frozen state, without weights."""
    r = _load(recipe, overrides)
    if by not in ("param", "layer", "group"):
        _fail([f"--by: '{by}' is not one of param, layer, group"])
    from . import lr_table as lt

    try:
        table = lt.lr_table(r, step=step, by=by)
    except ValueError as exc:
        _fail(str(exc).splitlines())
    if as_json:
        print(json.dumps(table, default=str))
    elif as_csv:
        sys.stdout.write(lt.to_csv(table))
    else:
        out.print(lt.render(table))


@app.command("pack-stats")
def pack_stats(
    recipe: str = RECIPE,
    overrides: Optional[list[str]] = OVERRIDES,
    data: Optional[str] = typer.Option(None, help="Replace the recipe's datasets by this JSONL or meta JSON."),
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
    r = _load(recipe, ov)
    from . import pack_stats as ps

    if world_size < 1:
        _fail([f"--world-size: must be >= 1, got {world_size}"])
    try:
        stats = ps.pack_stats(r, limit=limit, progress=not as_json and err.is_terminal,
                              world_size=world_size)
    except ValueError as exc:  # RecipeError included: a bad meta JSON given with --data, ...
        _fail(getattr(exc, "errors", None) or str(exc).splitlines())
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

    try:
        report = ck.check(r, samples=samples)
    except ValueError as exc:  # RecipeError and UnsupportedModel included
        _fail(getattr(exc, "errors", None) or str(exc).splitlines())
    if as_json:
        print(json.dumps(report))
    else:
        out.print(ck.render(report))
    if not ck.passed(report):
        raise typer.Exit(1)


def main() -> None:
    """The console script: the command, then a clean exit from the process group (if the
    command joined one), so gloo's threads do not die with the interpreter."""
    try:
        app()
    finally:
        if "torch.distributed" in sys.modules:
            from .distributed import shutdown

            shutdown()
