"""bf16 accumulates gradients in fp32 on every ZeRO stage where DeepSpeed supports it (1, 2,
3), read back from the engine DeepSpeed builds from vlmft's config, one process; the model is
loaded in the training dtype at every stage."""

from __future__ import annotations

import pytest
import torch

from vlmft import engine as ds
from vlmft import optim, schedule
from vlmft.forward import LossModule
from vlmft.model import load_model, load_processor
from vlmft.models import family_of
from vlmft.recipe import load

from .conftest import DEMO


def _engine(stage: int, precision: str):
    from vlmft.distributed import init

    _, world = init()
    recipe = load(DEMO, [f"engine.zero_stage={stage}", f"engine.precision={precision}"])
    with ds.zero3_init(ds.ds_config(recipe, world)):
        model = load_model(recipe.model, precision)
    opt, _ = optim.build_optimizer(model, recipe.optim)
    sched = schedule.scheduler(opt, recipe.schedule, recipe.train.max_steps)
    fam = family_of(load_processor(recipe.model))
    return ds.initialize(LossModule(model, fam, 64), opt, sched, recipe, world), model


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_in_fp32(stage, dist_env, in_root):
    eng, model = _engine(stage, "bf16")
    assert eng.get_data_types() == (torch.bfloat16, torch.float32)
    opt = eng.optimizer
    if stage == 1:   # DeepSpeed's BF16_Optimizer: fp32 gradient buffers
        assert type(opt).__name__ == "BF16_Optimizer" and opt.grad_acc_dtype == torch.float32
        assert all(g.dtype == torch.float32 for g in opt.fp32_groups_gradient_flat_partition)
    else:
        assert opt.gradient_accumulation_dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bf16_without_zero_and_fp32_keep_the_model_dtype(dist_env, in_root):
    eng, _ = _engine(0, "bf16")   # DeepSpeed has no fp32 accumulation without ZeRO
    assert eng.get_data_types() == (torch.bfloat16, torch.bfloat16)
    eng, _ = _engine(2, "fp32")
    assert eng.get_data_types() == (torch.float32, torch.float32)


def test_a_recipe_can_choose_the_accumulation_dtype(in_root):
    recipe = load(DEMO, ["engine.zero_stage=2", "engine.precision=bf16",
                         "engine.deepspeed.data_types.grad_accum_dtype=bf16"])
    assert ds.ds_config(recipe, 1)["data_types"] == {"grad_accum_dtype": "bf16"}
