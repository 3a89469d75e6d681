"""LR schedules (vlmft/schedule.py)."""

from __future__ import annotations

import math

import pytest
from torch import nn

from vlmft.optim import build_optimizer
from vlmft.recipe import LayerDecayConfig, OptimConfig, ScheduleConfig
from vlmft.schedule import lr_factor, scheduler


def test_warmup_starts_above_zero_and_reaches_the_peak():
    s = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.0)
    assert [lr_factor(k, s, 100) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_ends_at_min_lr_ratio(name):
    s = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, s, 110) == pytest.approx(1.0)
    assert lr_factor(60, s, 110) == pytest.approx(0.55)  # halfway: both give (1 + min) / 2
    assert lr_factor(110, s, 110) == pytest.approx(0.1)
    assert lr_factor(500, s, 110) == pytest.approx(0.1)  # clamped past max_steps
    values = [lr_factor(k, s, 110) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_shape_and_linear_shape():
    cos = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, cos, 100) == 1.0
    assert lr_factor(25, cos, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(25, lin, 100) == pytest.approx(0.75)


def test_constant_and_degenerate_cases():
    s = ScheduleConfig(name="constant", warmup_steps=2, min_lr_ratio=0.3)
    assert [lr_factor(k, s, 10) for k in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    s = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.2)
    assert lr_factor(9, s, 5) == 1.0          # warmup longer than training: warmup only
    assert lr_factor(10, s, 5) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="schedule.name"):
        lr_factor(0, ScheduleConfig(name="step"), 10)


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Module()
        self.vision_model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.language_model = nn.Linear(4, 4)


def test_scheduler_scales_every_group_by_its_own_base():
    model = TwoTowers()
    opt = OptimConfig(lr=1e-3, layer_decay=LayerDecayConfig(vision=0.5))
    optimizer, _ = build_optimizer(model, opt)
    bases = [g["lr"] for g in optimizer.param_groups]
    assert len(set(bases)) > 2
    sched = ScheduleConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    lr_sched = scheduler(optimizer, sched, max_steps=20)
    for step in range(25):
        f = lr_factor(step, sched, 20)
        for g, base in zip(optimizer.param_groups, bases):
            assert g["lr"] == pytest.approx(base * f), (step, g["name"])
            assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * f)
        optimizer.step()
        lr_sched.step()
