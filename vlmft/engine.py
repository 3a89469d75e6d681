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
    - ZeRO imports its Muon optimizer module just to run an ``isinstance`` check, which pulls
      in torch's compiler stack (~1.1 s a process here). vlmft never builds a Muon optimizer
      (optimizer blocks are refused), so a stand-in module answers that check.
    """
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name in ("deepspeed.runtime.zero.muon.muon_optimizer",):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
            sys.modules[name] = stub


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


def ds_config(recipe: Recipe, world_size: int) -> dict:
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
    for k, v in e.deepspeed.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def initialize(model, optimizer, scheduler, recipe: Recipe, world_size: int):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config(recipe, world_size))
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


def save(engine, ckpt_dir: Path, step: int, keep_last: int) -> None:
    """DeepSpeed's own checkpoint (model, optimizer, scheduler) tagged step{N}; the data
    stream's state is the step number. Older tags beyond keep_last are removed by rank 0."""
    import torch.distributed as dist

    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load(engine, path: Path) -> int:
    """Load a checkpoint folder (or the latest under it); return the step to continue from."""
    path = Path(path)
    if (path / "latest").is_file():
        _, client = engine.load_checkpoint(str(path))
    elif path.is_dir() and path.name.startswith("step"):
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    else:
        return 0
    return int(client["step"]) if client else 0


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
