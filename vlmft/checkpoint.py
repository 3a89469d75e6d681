"""Checkpoints (crash-safe, exactly resumable, across world sizes) and the final HF folder.

A checkpoint is ``{output_dir}/checkpoints/stepN``: DeepSpeed's own shards (model, optimizer,
scheduler), each rank's RNG state, vlmft's state (step, data-stream position, resolved recipe,
world size) and a ``COMPLETE`` marker written last; ``latest`` names the newest complete one.
Under LoRA the shards hold the adapters, the modules to save and their optimizer state only:
the frozen weights never change and come back from the model folder (a few percent of a full
checkpoint; tests/test_lora_dist.py measures it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .distributed import barrier, rank
from .peft_names import is_wrapped

COMPLETE = "COMPLETE"  # written into a tag folder once every rank has finished saving


def save(engine, ckpt_dir: Path, step: int, keep_last: int, extra: dict) -> Path:
    """Save a crash-safe checkpoint ``ckpt_dir/step{N}`` and point ``latest`` at it.

    Order: DeepSpeed writes model, optimizer and scheduler state (its own format, one shard per
    rank) with ``save_latest=False``; each rank adds its RNG states; after a barrier rank 0
    writes ``extra`` (step, data-stream state, resolved recipe), then the ``COMPLETE`` marker,
    then replaces ``latest`` atomically (write a temp file, fsync, rename). A kill at any point
    leaves ``latest`` naming the previous complete checkpoint.
    """
    import torch

    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=_lora(engine))
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        mark_complete(ckpt_dir, tag, extra, keep_last)
    barrier()
    return ckpt_dir / tag


def mark_complete(ckpt_dir: Path, tag: str, extra: dict, keep_last: int) -> None:
    """Rank 0, once every shard is on disk: vlmft's state, COMPLETE, then ``latest``; older
    complete checkpoints beyond ``keep_last`` are removed."""
    import torch

    torch.save(extra, ckpt_dir / tag / "vlmft_state.pt")
    _atomic_write(ckpt_dir / tag / COMPLETE, tag)
    _atomic_write(ckpt_dir / "latest", tag)
    done = sorted(complete_tags(ckpt_dir), key=lambda t: int(t[4:]))
    for old in done[:-keep_last]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def complete_tags(ckpt_dir: Path) -> list[str]:
    return [p.name for p in Path(ckpt_dir).glob("step*") if (p / COMPLETE).is_file()]


def resolve_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """'auto' -> the checkpoint ``latest`` names (or the newest complete one); a path -> itself,
    which must be a complete checkpoint folder. None when 'auto' finds nothing."""
    if resume != "auto":
        p = Path(resume)
        if not (p / COMPLETE).is_file():
            raise ValueError(f"--resume: '{resume}' is not a complete vlmft checkpoint "
                             f"(no {COMPLETE} file); use a folder like {ckpt_dir}/step100 or 'auto'")
        return p
    latest = Path(ckpt_dir) / "latest"
    if latest.is_file() and (Path(ckpt_dir) / latest.read_text().strip() / COMPLETE).is_file():
        return Path(ckpt_dir) / latest.read_text().strip()
    tags = sorted(complete_tags(ckpt_dir), key=lambda t: int(t[4:]))
    return Path(ckpt_dir) / tags[-1] if tags else None


def saved_state(path: Path) -> dict:
    """vlmft's own part of a checkpoint: step, stream state, resolved recipe, world size."""
    import torch

    return torch.load(Path(path) / "vlmft_state.pt", weights_only=False)


def to_universal(path: Path) -> Path:
    """ZeRO shards are cut for the world size that saved them. To resume on another number of
    ranks, rank 0 converts the checkpoint once with DeepSpeed's own ``ds_to_universal`` into
    ``path/universal/<tag>`` (reused if already there); every rank then loads it with
    ``load_universal``. Returns the folder holding the converted tag."""
    out = Path(path) / "universal"
    if rank() == 0 and not (out / path.name / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(path), "--output_folder", str(out / path.name),
                            "--inject_missing_state"], capture_output=True, text=True)
        if p.returncode != 0:
            raise ValueError(f"--resume: converting {path} for another world size failed:\n"
                             + p.stderr[-2000:])
        _atomic_write(out / path.name / COMPLETE, path.name)
    barrier()
    return out


def load(engine, path: Path, universal: bool = False) -> None:
    """Load model, optimizer, scheduler (DeepSpeed) and this rank's RNG. ``universal``: a
    checkpoint from another world size, converted by :func:`to_universal`."""
    import torch

    path = Path(path)
    strict = not _lora(engine)  # a LoRA checkpoint holds the trained parameters only
    if universal:
        engine.load_checkpoint(str(to_universal(path)), tag=path.name, load_module_strict=strict)
    else:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=strict)
    rng = path / f"rng_rank{rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))


def _lora(engine) -> bool:
    """Whether the engine trains LoRA adapters: its checkpoints then leave out the frozen
    weights (DeepSpeed's exclude_frozen_parameters), which the model folder holds unchanged."""
    return any(is_wrapped(m) for m in engine.module.modules())


def _rng_state() -> dict:
    import random

    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export(engine, model, processor, path: str, adapter: str | None = None) -> None:
    """Save ``model`` (the HF model the engine trains) as an HF folder: safetensors, config,
    generation config, processor and chat template, from any ZeRO stage (under ZeRO-3 the
    parameters are gathered first; every rank takes part, rank 0 writes). See
    vlmft/export.py for what makes the folder ready for inference. A LoRA model is saved
    merged at ``path`` and as peft's adapter folder at ``adapter`` (when given)."""
    from .export import merged_state, quantized, save_adapter, save_for_inference, unquantized_base

    state = None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
        if rank() == 0:
            prefix = _prefix(engine.module, model)
            state = {k.removeprefix(prefix): v for k, v in full.items()}
    if rank() == 0:
        target = model
        if is_wrapped(model):
            state = state if state is not None else model.state_dict()
            if adapter:
                save_adapter(model, processor, adapter, state)
            base = unquantized_base(model) if quantized(model) else None
            state = merged_state(model, state, base.state_dict() if base is not None else None)
            target = base if base is not None else model
        save_for_inference(target, processor, path, state)
    barrier()


def _prefix(root, model) -> str:
    """The name prefix of ``model``'s parameters inside the module DeepSpeed wraps."""
    for name, mod in root.named_modules():
        if mod is model:
            return f"{name}." if name else ""
    raise ValueError("the exported model is not inside the engine's module")
