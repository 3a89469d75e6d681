"""The process-wide settings of a vlmft command, made in one explicit call by the CLI after the
recipe validated and before the heavy imports run: torch's CPU threads per rank and the model
hub's offline mode (vlmft/hub.py). Library functions never change these themselves.
"""

from __future__ import annotations

import os


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask: what a scheduler or taskset gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE."""
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(k, "").isdigit() and int(os.environ[k]) > 0:
            return int(os.environ[k])
    return 1


def threads_per_rank() -> int | None:
    """The CPUs available shared among this machine's ranks (at least 1); None when
    OMP_NUM_THREADS is set: the user's (or the launcher's) choice stands."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpus_available() // local_world_size())


def set_threads() -> int:
    """Give torch ``threads_per_rank()`` intra-op threads; returns the number in use.

    Torch's default is every core of the machine in every process, so ranks that share a
    machine oversubscribe it (8 ranks on a 64-core node: 512 OpenMP threads, e.g. in ZeRO-Offload's
    CPU Adam); torchrun avoids that by exporting OMP_NUM_THREADS=1, the deepspeed launcher and
    hand-written launches do not. Issue 17 reported a 2-rank demo run on the 2-core development
    machine 10x slower with the default (3.4 s/step vs 0.28 s/step with one thread per rank).
    Re-measured 2026-11-30 (benchmarks/bench_threads.py, benchmarks/README.md "CPU threads per
    rank"), the demo's steps took 0.06-0.15 s either way and the ratio default / one thread
    per rank ranged 0.57-2.18 over alternated runs on the shared machine: no consistent effect
    at this size; the 10x was not reproduced.
    """
    import torch

    n = threads_per_rank()
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def setup(model_name: str, *, threads: bool = False, distributed: bool = False) -> list[str]:
    """The one set-up call: torch threads (``threads``: for commands that compute), the
    accelerator and rendezvous variables (``distributed``: for commands that join a process
    group, vlmft/distributed.py) and the hub's offline mode when it cannot be reached. Returns
    notes to print."""
    from . import hub

    if distributed:
        from .distributed import setup_environment

        setup_environment()
    if threads:
        set_threads()
    note = hub.prepare(model_name)
    return [note] if note else []
