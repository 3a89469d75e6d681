"""The DeepSpeed engine: its config from the recipe, initialize, backward.

DeepSpeed shards optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3). vlmft
hands it a real torch AdamW with its own parameter groups (never an optimizer block, which would
flatten them) and does its own loss scaling (see loss.py for the algebra). The process group is
vlmft/distributed.py's, checkpoints and the final folder vlmft/checkpoint.py's.

bf16 accumulates gradients in fp32 (``data_types.grad_accum_dtype``) on ZeRO 1, 2 and 3:
DeepSpeed's default is the model dtype, and with vlmft's loss scaling each micro-batch adds
about 1/grad_accum_steps of the step's gradient, the worst case for bf16 sums. ZeRO-1 then runs
DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep an fp32 gradient partition. Without ZeRO (stage 0)
DeepSpeed supports only model-dtype accumulation, so bf16 there sums in bf16. A recipe may set
``engine.deepspeed.data_types.grad_accum_dtype`` itself.

Under ZeRO-3 the model is built inside :func:`zero3_init`: transformers' from_pretrained then
runs in DeepSpeed's ``zero.Init`` and every parameter is partitioned as it is built, in the
training dtype; rank 0 reads the checkpoint (memory-mapped) and fills one module at a time.
"""

from __future__ import annotations

from contextlib import contextmanager

from .distributed import _cuda_available
from .recipe import Recipe


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
        "train_batch_size": t.global_batch(world_size),
        "gradient_clipping": e.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if e.precision == "bf16" and e.zero_stage >= 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    for k, v in e.deepspeed.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@contextmanager
def zero3_init(config: dict):
    """Models built inside are partitioned by ZeRO-3 as they are built (when ``config``, a
    :func:`ds_config`, has stage 3; otherwise nothing happens). transformers reads the DeepSpeed
    config through a weak reference: the HfDeepSpeedConfig lives exactly as long as this block."""
    if (config.get("zero_optimization") or {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


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
