"""LearningRateFunction and SetWeightDecay: the rate set at every optimizer step against the formulas written out,
resume, bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader

from sparse_lightning import LearningRateFunction, SetWeightDecay


class Rates(pl.Callback):
    def __init__(self):
        self.rates, self.decays = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates[trainer.global_step] = optimizer.param_groups[0]["lr"]
        self.decays[trainer.global_step] = optimizer.param_groups[0]["weight_decay"]


def _rates(*callbacks, epochs=4):
    torch.manual_seed(0)
    rates = Rates()
    pl.Trainer(max_epochs=epochs, callbacks=[*callbacks, rates], **QUIET).fit(TinyNet("sgd", lr=0.5), tiny_loader())
    return rates  # 8 steps an epoch, 32 steps


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"function": "linear", "init_lr": 0.1, "final_lr": 0.02, "start": 8, "end": 24},
            lambda s: 0.1 - 0.08 * (s - 8) / 16,
        ),
        (
            {"function": "cosine", "init_lr": 0.1, "final_lr": 0.0, "start": "1ep", "end": "3ep"},
            lambda s: 0.05 * (1 + math.cos(math.pi * (s - 8) / 16)),
        ),
        (
            {"function": "cyclic_linear", "init_lr": 0.1, "final_lr": 0.0, "start": 8, "end": 24, "cycle": 4},
            lambda s: 0.1 - 0.1 * ((s - 8) % 4) / 4,
        ),
        (
            {"function": "step", "init_lr": 0.1, "start": 8, "end": 24, "step_size": "1ep", "gamma": 0.5},
            lambda s: 0.1 * 0.5 ** ((s - 8) // 8),
        ),
        (
            {"function": "exponential", "init_lr": 0.1, "start": 8, "end": 24, "gamma": 0.9},
            lambda s: 0.1 * 0.9 ** ((s - 8) // 8),
        ),
        (
            {"function": "multistep", "init_lr": 0.1, "start": 8, "end": 24, "milestones": [12, "2ep"], "gamma": 0.1},
            lambda s: 0.1 * 0.1 ** ((s >= 12) + (s >= 16)),
        ),
        ({"function": "constant", "init_lr": 0.03, "start": 8, "end": 24}, lambda s: 0.03),
    ],
    ids=["linear", "cosine", "cyclic_linear", "step", "exponential", "multistep", "constant"],
)
def test_the_rate_follows_the_function_inside_the_window_and_stays_outside(kwargs, expected):
    rates = _rates(LearningRateFunction(**kwargs)).rates
    assert len(rates) == 32
    for step, rate in rates.items():
        if step < 8:
            assert rate == 0.5, step  # the module's own rate before the window
        elif step < 24:
            assert rate == pytest.approx(expected(step), rel=1e-12, abs=1e-15), step
        else:
            assert rate == pytest.approx(expected(23), rel=1e-12, abs=1e-15), step  # the last value stays


def test_two_functions_in_sequence_warm_up_then_decay_and_weight_decay_from_a_step():
    warmup = LearningRateFunction("linear", init_lr=0.0, final_lr=0.1, start=0, end=8)
    decay = LearningRateFunction("cosine", init_lr=0.1, final_lr=0.001, start=8)
    rates = _rates(warmup, decay, SetWeightDecay(1e-4, start="2ep"))
    assert rates.rates[0] == 0.0 and rates.rates[4] == pytest.approx(0.05) and rates.rates[8] == pytest.approx(0.1)
    assert rates.rates[31] == pytest.approx(0.001 + 0.0495 * (1 + math.cos(math.pi * 23 / 24)))
    assert all(rates.decays[s] == (1e-4 if s >= 16 else 0.0) for s in rates.decays)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"function": "triangle"}, "`function` must be one of"),
        ({"function": "linear", "init_lr": 0.1}, "function='linear' needs `final_lr`"),
        ({"function": "cyclic_linear", "final_lr": 0.0}, "needs `cycle`"),
        ({"function": "step"}, "needs `step_size`"),
        ({"function": "multistep"}, "needs `milestones`"),
        ({"init_lr": -1.0}, "`init_lr` must be >= 0"),
        ({"gamma": 0}, "`gamma` must be > 0"),
        ({"param_groups": "all"}, "`param_groups` must be a list"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LearningRateFunction(**kwargs)


def test_a_window_that_ends_before_it_starts_and_a_missing_group_are_refused():
    with pytest.raises(ValueError, match=r"`end` \(step 8\) must come after `start` \(step 16\)"):
        _rates(LearningRateFunction(init_lr=0.1, start=16, end=8))
    with pytest.raises(ValueError, match="names group 3, but the optimizer has 1"):
        _rates(SetWeightDecay(1e-4, param_groups=[3]))
