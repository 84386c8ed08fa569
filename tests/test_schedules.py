import math

import lightning.pytorch as pl
import pytest
from helpers import QUIET, TinyNet, tiny_loader

from sparse_lightning.callbacks.base import timeline_of
from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.plan import Timeline
from sparse_lightning.core.schedules import CURVES, is_event, parse_time, sparsity_at


@pytest.mark.parametrize("step", [0, 10, 25, 50, 73, 100])
def test_cubic_matches_zhu_gupta(step):
    s_i, s_f, t0, n_dt = 0.1, 0.9, 0, 100
    expected = s_f + (s_i - s_f) * (1 - (step - t0) / n_dt) ** 3
    assert sparsity_at(step, t0, t0 + n_dt, s_i, s_f, "cubic") == pytest.approx(expected, abs=1e-12)


def test_curve_values_at_chosen_points():
    assert sparsity_at(50, 0, 100, 0.0, 0.8, "linear") == pytest.approx(0.4)
    assert sparsity_at(50, 0, 100, 0.0, 0.8, "cosine") == pytest.approx(0.4)
    assert sparsity_at(25, 0, 100, 0.0, 0.8, "cosine") == pytest.approx(0.8 * (1 - math.cos(math.pi / 4)) / 2)
    # exponential: density halves from 1 to 0.25 over the window -> 0.5 at the middle
    assert sparsity_at(50, 0, 100, 0.0, 0.75, "exponential") == pytest.approx(0.5)
    assert sparsity_at(1, 0, 100, 0.0, 0.75, "constant") == 0.75
    # SparseML's inverse_cubic: 1 - (1 - 7/8)^(1/3) = 1/2 of the way at 7/8 of the window
    assert sparsity_at(875, 0, 1000, 0.1, 0.9, "inverse_cubic") == pytest.approx(0.5)


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_every_curve_starts_and_ends_on_target(curve):
    assert sparsity_at(-1 + 10, 10, 110, 0.2, 0.9, curve) == 0.0  # before start nothing is pruned
    if curve != "constant":
        assert sparsity_at(10, 10, 110, 0.2, 0.9, curve) == pytest.approx(0.2)
    assert sparsity_at(110, 10, 110, 0.2, 0.9, curve) == pytest.approx(0.9)
    assert sparsity_at(500, 10, 110, 0.2, 0.9, curve) == pytest.approx(0.9)


def test_curves_differ_from_each_other():
    values = {c: sparsity_at(30, 0, 100, 0.0, 0.9, c) for c in CURVES}
    assert len({round(v, 6) for v in values.values()}) == len(CURVES)


def test_events():
    assert [s for s in range(40) if is_event(s, 5, 23, 5)] == [5, 10, 15, 20, 23]


@pytest.mark.parametrize(
    ("value", "kind", "number"),
    [
        (10, "steps", 10),
        (0.5, "fraction", 0.5),
        ("3ep", "epochs", 3.0),
        ("0.5ep", "epochs", 0.5),
        (" 2 ep", "epochs", 2),
    ],
)
def test_parse_time(value, kind, number):
    spec = parse_time(value, "start")
    assert (spec.kind, spec.value) == (kind, number)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "`end` must be >= 0"),
        (1.5, r"`end` as a float .* \(0, 1\]"),
        ("3 epochs", "could not parse '3 epochs'"),
        (True, "`end` must be"),
        ([3], "`end` must be"),
    ],
)
def test_parse_time_errors(value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_time(value, "end")


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="`every` must be >= 1"):
        parse_time(0, "every", allow_zero=False)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_time_resolves_in_optimizer_steps(accumulate):
    """10 batches per epoch: with accumulation 4 an epoch has ceil(10 / 4) = 3 optimizer steps."""
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["ep"] = timeline_of(trainer).step(parse_time("2ep", "end"), "end")
            seen["frac"] = timeline_of(trainer).step(parse_time(0.5, "end"), "end")
            seen["total"] = trainer.estimated_stepping_batches

    trainer = pl.Trainer(max_epochs=4, accumulate_grad_batches=accumulate, callbacks=[Probe()], **QUIET)
    trainer.fit(TinyNet(), tiny_loader(n=80))
    per_epoch = math.ceil(10 / accumulate)
    assert seen["ep"] == 2 * per_epoch
    assert seen["total"] == 4 * per_epoch
    assert seen["frac"] == round(0.5 * 4 * per_epoch)
    assert trainer.global_step == 4 * per_epoch


@pytest.mark.parametrize(
    ("start", "end", "every", "expected"),
    [
        (0, 1.0, 10, (0, 99, 10)),  # end = the run's length means its last step
        ("1ep", "5ep", "0.5ep", (10, 50, 5)),
        (0.1, 0.5, 1, (10, 50, 1)),
    ],
)
def test_window_resolves_steps(start, end, every, expected):
    timeline = Timeline(total_steps=100, steps_per_epoch=10)
    spec = (parse_time(start, "start"), parse_time(end, "end"), parse_time(every, "every", allow_zero=False))
    assert timeline.window(*spec) == expected


@pytest.mark.parametrize(
    ("start", "end", "every", "message"),
    [
        (0, 101, 1, r"`end`=101 is optimizer step 101, but training has only 100 steps"),
        (50, 50, 1, r"`end`=50 \(step 50\) must come after `start`=50 \(step 50\)"),
        (0.99, 1.0, 1, r"`end`=1.0 \(step 99\) must come after `start`=0.99 \(step 99\)"),
        (0, 50, "0.04ep", r"`every`=0.04ep resolves to 0 steps; it must be at least 1"),
    ],
)
def test_window_rule_errors(start, end, every, message):
    timeline = Timeline(total_steps=100, steps_per_epoch=10)
    spec = (parse_time(start, "start"), parse_time(end, "end"), parse_time(every, "every", allow_zero=False))
    with pytest.raises(ConfigError, match=message):
        timeline.window(*spec)


def test_unknown_length_refuses_fractions_and_epochs_but_not_steps():
    timeline = Timeline(total_steps=math.inf, steps_per_epoch=math.inf)
    assert timeline.window(parse_time(0, "start"), parse_time(500, "end"), parse_time(10, "every")) == (0, 500, 10)
    with pytest.raises(ConfigError, match=r"`end`=0.5 is a fraction of training, but training has no fixed length"):
        timeline.step(parse_time(0.5, "end"), "end")
    with pytest.raises(ConfigError, match=r"`every`='2ep' counts epochs, but the training dataloader has no length"):
        timeline.step(parse_time("2ep", "every"), "every")
