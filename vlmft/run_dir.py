"""A run's output_dir: one run per folder, unless told otherwise.

``vlmft train`` into a folder that already holds files is refused (:func:`refusal`) unless
``--resume`` (continue the run there) or ``--overwrite`` (start a new one: :func:`clear`
removes the previous run's checkpoints, final model, metrics and recipe first, so a later
``--resume auto`` never mixes two runs' checkpoints). These checks run before anything heavy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# what a run writes into output_dir (train.py, metrics.py, engine.py, eval.py, plot.py, export.py)
ARTIFACTS = ("checkpoints", "final", "adapter", "metrics.jsonl", "recipe.yaml", "tb", "wandb", "eval", "curves.png")
# what `vlmft eval` may write there before any training (predictions): not yet a run
BEFORE_TRAINING = ("eval",)


def _contents(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    steps = sorted((p.name for p in (folder / "checkpoints").glob("step*")),
                   key=lambda s: int(s[4:]) if s[4:].isdigit() else -1)
    shown = ", ".join(n + ("/" if (folder / n).is_dir() else "") for n in names[:4])
    return shown + (f", ... ({len(names)} entries)" if len(names) > 4 else "") + (
        f"; checkpoints up to {steps[-1]}" if steps else "")


def refusal(output_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """The one line that stops a run from writing into another run's folder, else None."""
    if resume and overwrite:
        return ("--resume continues the run in output_dir and --overwrite replaces it; give "
                "one of them")
    folder = Path(output_dir).expanduser()
    if resume or overwrite or not folder.is_dir() or all(p.name in BEFORE_TRAINING for p in folder.iterdir()):
        return None
    return (f"output_dir: '{output_dir}' already holds a run ({_contents(folder)}); pass "
            "--resume auto to continue it, --overwrite to replace it, or choose another output_dir")


def create(output_dir: str) -> str | None:
    """Make the folder now (validation only asked the file system): why it cannot be, or None."""
    try:
        Path(output_dir).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"output_dir: cannot create '{output_dir}': {exc.strerror or exc}; choose another output_dir"
    return None


def clear(output_dir: str) -> list[str]:
    """Remove the previous run's files (only those vlmft writes); returns their names."""
    folder = Path(output_dir).expanduser()
    removed = []
    for name in ARTIFACTS:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def resume_note(output_dir: str, resume: str | None) -> str | None:
    """What ``--resume auto`` will do: the checkpoint it continues from, or a fresh start."""
    if resume != "auto":
        return None
    from .checkpoint import resolve_resume

    ckpt_dir = Path(output_dir) / "checkpoints"
    found = resolve_resume(ckpt_dir, "auto")
    if found is None:
        return f"vlmft: --resume auto: no complete checkpoint in {ckpt_dir}; starting fresh at step 1"
    return f"vlmft: --resume auto: resuming from {found}"
