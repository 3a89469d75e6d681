"""The process group: the environment a plain ``vlmft train`` lacks, joining the group, the few
collectives vlmft makes itself, and leaving.

:func:`setup_environment` is the one place that writes the environment (the CLI calls it, via
vlmft/runtime.py, before anything joins a group): without a GPU ``DS_ACCELERATOR=cpu`` (gloo),
and for a single process the rendezvous variables torchrun would have set.

Two DeepSpeed start-up costs that training does not need are avoided, each only after probing
that the installed DeepSpeed still works the way the patch assumes (else skipped, with a debug
line, and the start is merely slower):

- its shared-memory all-reduce op is JIT-compiled at the first ``init_distributed`` on the CPU
  accelerator: 150-175 s on a 2-core machine (cached afterwards, but every fresh CI machine pays
  it). gloo does the all-reduces instead; the op is marked incompatible.
- ZeRO imports its Muon optimizer modules for an ``isinstance`` check at initialize and for a
  ``muon_update`` import in the first optimizer step; they pull in torch's compiler stack (~1.1 s
  and ~3 s a process here). vlmft never builds a Muon optimizer (optimizer blocks are refused),
  so stand-in modules answer those imports: only when every name DeepSpeed imports from them is
  one the stand-ins define (:func:`muon_imports`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import types
from pathlib import Path

log = logging.getLogger(__name__)

MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")
MUON_STUBS = {"MuonWithAuxAdam", "muon_update", "adam_update"}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_environment() -> None:
    """Pick the accelerator and fill the rendezvous variables a single process lacks."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process, not under torchrun / the deepspeed launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend() -> str:
    return "nccl" if os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" and _cuda_available() else "gloo"


def muon_imports(root: Path | None = None) -> dict[str, set[str]]:
    """Names the installed DeepSpeed imports from its Muon modules, read from its sources (the
    Muon package itself left out); ``"<import>"`` collects files that import a module whole."""
    import ast

    if root is None:
        import deepspeed

        root = Path(deepspeed.__file__).parent / "runtime"
    out: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        text = path.read_text(errors="ignore")
        if "zero.muon" not in text or "muon" in path.parent.name:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed.runtime.zero.muon"):
                out.setdefault(node.module, set()).update(a.name for a in node.names)
            elif isinstance(node, ast.Import) and any("zero.muon" in a.name for a in node.names):
                out.setdefault("<import>", set()).add(path.name)
    return out


def _avoid_slow_starts() -> None:
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        ops = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(ops, dict) and "deepspeed_shm_comm" in ops:
            ops["deepspeed_shm_comm"] = False
        else:
            log.debug("vlmft: DeepSpeed's shm comm op is not where expected; not disabling its build")
    found = muon_imports()
    if set(found) <= set(MUON_MODULES) and all(names <= MUON_STUBS for names in found.values()):
        for name in MUON_MODULES:
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
                stub.muon_update = stub.adam_update = _no_muon
                sys.modules[name] = stub
    else:
        log.debug("vlmft: DeepSpeed imports %s from its Muon modules; not stubbing them", found)


def _no_muon(*args, **kwargs):
    raise RuntimeError("vlmft never builds a Muon optimizer")


def init() -> tuple[int, int]:
    """(rank, world_size) after joining the process group (setup_environment first)."""
    if "RANK" not in os.environ:
        raise RuntimeError("vlmft.distributed.setup_environment() (the CLI's set-up call) must run first")
    import deepspeed
    import torch.distributed as dist

    _avoid_slow_starts()
    be = backend()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=be)
    if be == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(t):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_lists(items: list) -> list:
    """Every rank's list (picklable items), concatenated in rank order, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, items)
    return [x for part in every for x in part]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly at the end of a command: gloo's threads otherwise die
    with the interpreter ("terminate called without an active exception", a non-zero exit
    seen once in 2-rank runs)."""
    import torch.distributed as dist

    if dist.is_initialized():  # local: no barrier, so a failing rank can never hang here
        dist.destroy_process_group()
