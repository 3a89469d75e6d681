"""Worker for the ZeRO-3 loading and trace tests (tests/test_zero3.py), one torchrun launch:

    torchrun --standalone --nproc_per_node 2 tests/zero3_worker.py MODEL_DIR OUT_DIR

``load``: the model at MODEL_DIR loaded as ``vlmft train`` loads it under ZeRO-3
(``engine.zero3_init`` around ``model.load_model``) and, as the control, without it: the most
parameter elements each rank held at once while loading (:func:`peak_param_elements`), the
elements held after the load, and the optimizer plan (no-decay, shapes) of both models. (Rank 0
also maps the checkpoint file, memory-mapped pages, not parameters.)

``losses``: ``vlmft train`` (the Typer command, in this process) on MODEL_DIR for 3 steps, fp32,
ZeRO-2 and then ZeRO-3 (partitioned as it is built): metrics.jsonl of each.

``trace``: ``vlmft train`` for 6 ZeRO-3 steps with ``loss.chunk_size=8`` and DeepSpeed's
``log_trace_cache_warnings`` on, counting the "Invalidate trace cache" lines DeepSpeed prints;
then the control: the same run with one more head chunk in every other step (the head calls
vary between micro-batches, as with a chunk count per micro-batch).

Rank 0 writes OUT_DIR/results.json; the tests hold the thresholds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"


def peak_param_elements(fn):
    """(fn(), the most parameter elements this process held at once while fn ran). Every
    parameter registered meanwhile is watched (torch's global registration hook); after every
    tensor operation (a dispatch mode) the held elements are summed: the full tensor where a
    parameter is materialized, ZeRO-3's partition (``ds_tensor``) where it is partitioned."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    params: dict[int, weakref.ref] = {}
    state = {"peak": 0}

    def held() -> int:
        n = 0
        for ref in params.values():
            p = ref()
            if p is not None:
                part = getattr(p, "ds_tensor", None)
                n += p.data.numel() + (part.numel() if part is not None else 0)
        return n

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            state["peak"] = max(state["peak"], held())
            return out

    def registered(module, name, param):
        if param is not None:
            params[id(param)] = weakref.ref(param)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    try:
        with Watch():
            out = fn()
    finally:
        handle.remove()
    return out, state["peak"]


def task_load(model_dir: str) -> dict:
    from vlmft import engine as ds
    from vlmft import optim
    from vlmft.model import load_model
    from vlmft.recipe import load

    recipe = load(DEMO, [f"model.name_or_path={model_dir}", "engine.zero_stage=3", "engine.precision=fp32"])
    world = torch.distributed.get_world_size()
    out = {}
    for variant in ("zero3_init", "plain"):
        def build():
            ctx = ds.zero3_init(ds.ds_config(recipe, world)) if variant == "zero3_init" else contextlib.nullcontext()
            with ctx:
                return load_model(recipe.model, recipe.engine.precision)

        model, peak = peak_param_elements(build)
        params = list(model.parameters())
        rows, _ = optim.plan(model, recipe.optim)
        out[variant] = {
            "peak_elements": peak,
            "full_elements": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "held_elements": sum(p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
                                 for p in params),
            "partitioned": all(hasattr(p, "ds_id") for p in params),
            "plan": [[r.name, list(r.shape), r.numel, r.weight_decay, r.group] for r in rows],
        }
        del model, params
    return out


def _train(args: list[str]) -> None:
    from vlmft.cli import app

    app(["train", str(DEMO), *args], standalone_mode=False)


def task_losses(model_dir: str, out: Path) -> dict:
    runs = {}
    for stage in (2, 3):
        dest = out / f"losses_z{stage}"
        _train([f"output_dir={dest}", f"model.name_or_path={model_dir}", f"engine.zero_stage={stage}",
                "engine.precision=fp32", "train.max_steps=3", "train.grad_accum_steps=2",
                "checkpoint.every_steps=0", "--overwrite"])
        runs[stage] = str(dest)
    return runs


def task_trace(out: Path) -> dict:
    from vlmft import forward

    real = forward.LossModule.forward
    calls = {"n": 0}

    def varying(self, inputs, weights, n_chunks=None, **kw):   # the control: + 1 head call every other step
        step = calls["n"] // 2
        calls["n"] += 1
        return real(self, inputs, weights, n_chunks=n_chunks + step % 2, **kw)

    res = {}
    for mode in ("fixed", "varying"):
        if mode == "varying":
            forward.LossModule.forward = varying
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                _train([f"output_dir={out / ('trace_' + mode)}", "engine.zero_stage=3", "engine.precision=fp32",
                        "train.max_steps=6", "train.grad_accum_steps=2", "loss.chunk_size=8",
                        "engine.deepspeed.zero_optimization.log_trace_cache_warnings=true",
                        "checkpoint.every_steps=0", "--overwrite"])
        finally:
            forward.LossModule.forward = real
        res[mode] = {"invalidations": buf.getvalue().count("Invalidate trace cache"),
                     "lines": [x for x in buf.getvalue().splitlines() if "Invalidate" in x][:8]}
    return res


def main(argv: list[str]) -> None:
    from vlmft.distributed import init, setup_environment

    model_dir, out = argv[1], Path(argv[2]).resolve()
    os.chdir(ROOT)
    out.mkdir(parents=True, exist_ok=True)
    setup_environment()
    rank, _ = init()
    results = {"load": task_load(model_dir), "losses": task_losses(model_dir, out), "trace": task_trace(out)}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    else:
        (out / f"load_rank{rank}.json").write_text(json.dumps(results["load"]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
