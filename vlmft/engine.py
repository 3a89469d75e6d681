"""The only module that imports deepspeed: environment, config, initialize, checkpoints.

DeepSpeed shards optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3). vlmft
hands it a real torch AdamW with its own parameter groups (never an optimizer block, which would
flatten them) and does its own loss scaling (see loss.py for the algebra).

CPU (no GPU visible): ``DS_ACCELERATOR=cpu`` and gloo, set here before deepspeed is imported, so
the same command runs on a laptop, in CI and on a GPU node.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import types
from pathlib import Path

from .recipe import Recipe


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_environment() -> str:
    """Pick the accelerator and fill the rendezvous variables a plain ``vlmft train`` lacks.
    Returns the torch.distributed backend."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process, not under torchrun / the deepspeed launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return "nccl" if os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" and _cuda_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _avoid_slow_starts() -> None:
    """Two costs DeepSpeed puts on every CPU start that training does not need:

    - its shared-memory all-reduce op is JIT-compiled at the first ``init_distributed`` on the
      CPU accelerator: 150-175 s on a 2-core machine (cached afterwards, but every fresh CI
      machine pays it). gloo does the all-reduces instead; we mark the op incompatible.
    - ZeRO imports its Muon optimizer modules for an ``isinstance`` check at initialize and for
      a ``muon_update`` import in the first optimizer step; they pull in torch's compiler stack
      (~1.1 s and ~3 s a process here). vlmft never builds a Muon optimizer (optimizer blocks
      are refused), so stand-in modules answer both.
    """
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name in ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
            stub.muon_update = stub.adam_update = _no_muon
            sys.modules[name] = stub


def _no_muon(*args, **kwargs):
    raise RuntimeError("vlmft never builds a Muon optimizer")


def init_distributed() -> tuple[int, int]:
    """(rank, world_size) after joining the process group."""
    backend = setup_environment()
    import deepspeed
    import torch.distributed as dist

    _avoid_slow_starts()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def ds_config(recipe: Recipe, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config from the recipe. Batch keys are vlmft's (train.*); our own loss
    scaling assumes DeepSpeed divides by gradient_accumulation_steps only when asked."""
    e, t = recipe.engine, recipe.train
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _cuda_available()}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": _cuda_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": e.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    for k, v in e.deepspeed.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def offload_optimizer(optimizer):
    """ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorized CPU AdamW with the
    same parameter groups (lr, lr_scale, weight decay and names carried over). Its kernel is
    JIT-compiled once per machine (~140 s on 2 cores), then cached under TORCH_EXTENSIONS_DIR."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                            weight_decay=d["weight_decay"], adamw_mode=True)


def initialize(model, optimizer, scheduler, recipe: Recipe, world_size: int, load_universal: bool = False):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config(recipe, world_size, load_universal))
    return engine


def backward(engine, loss) -> None:
    """Backward without DeepSpeed's 1/grad_accum_steps: our loss is already normalized over the
    whole step (loss.py)."""
    engine.backward(loss, scale_wrt_gas=False)


def all_reduce_sum(t):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
    import torch.distributed as dist

    tag = f"step{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    _barrier()
    if os.environ.get("VLMFT_FAULT_KILL_IN_SAVE") == str(step):
        # Fault injection for the crash-safety test: die after the shards, before COMPLETE.
        os.kill(os.getpid(), 9)
    if rank == 0:
        torch.save(extra, ckpt_dir / tag / "vlmft_state.pt")
        _atomic_write(ckpt_dir / tag / COMPLETE, tag)
        _atomic_write(ckpt_dir / "latest", tag)
        done = sorted(complete_tags(ckpt_dir), key=lambda t: int(t[4:]))
        for old in done[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


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
    import subprocess
    import torch.distributed as dist

    out = Path(path) / "universal"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (out / path.name / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(path), "--output_folder", str(out / path.name),
                            "--inject_missing_state"], capture_output=True, text=True)
        if p.returncode != 0:
            raise ValueError(f"--resume: converting {path} for another world size failed:\n"
                             + p.stderr[-2000:])
        _atomic_write(out / path.name / COMPLETE, path.name)
    _barrier()
    return out


def load(engine, path: Path, universal: bool = False) -> None:
    """Load model, optimizer, scheduler (DeepSpeed) and this rank's RNG. ``universal``: a
    checkpoint from another world size, converted by :func:`to_universal`."""
    import torch
    import torch.distributed as dist

    path = Path(path)
    if universal:
        engine.load_checkpoint(str(to_universal(path)), tag=path.name)
    else:
        engine.load_checkpoint(str(path.parent), tag=path.name)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))


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


def shutdown() -> None:
    """Leave the process group cleanly at the end of a command: gloo's threads otherwise die
    with the interpreter ("terminate called without an active exception", a non-zero exit
    seen once in 2-rank runs)."""
    import torch.distributed as dist

    if dist.is_initialized():  # local: no barrier, so a failing rank can never hang here
        dist.destroy_process_group()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def export(engine, processor, path: str) -> None:
    """Save an HF folder (safetensors, config, processor, chat template) from any ZeRO stage;
    under ZeRO-3 the parameters are gathered first. Rank 0 writes."""
    import torch.distributed as dist

    hf_model = engine.module.model  # engine.module is train.LossModule
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = None
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
        if rank == 0:
            state = {k.removeprefix("model."): v for k, v in full.items()}
    if rank == 0:
        hf_model.save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
