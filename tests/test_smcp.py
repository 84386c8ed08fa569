"""SMCP: ramp, importances, soft masks (straight-through), knapsack re-solves, hardening, resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import ResumeProbe, StopAfter

from sparse_lightning import SoftMaskChannelPruning, masks_of
from sparse_lightning.callbacks.smcp import ramp_ratio
from sparse_lightning.structure import channel_masks


class Tiny(TinyNet):
    example_input_array = torch.zeros(2, 16)


def test_ramps_follow_the_reference_formulas():
    assert ramp_ratio("exp", 0.6, 3, 10) == pytest.approx(0.6 * (1 - math.exp(-0.15)) / (1 - math.exp(-0.5)))
    assert ramp_ratio("exp2", 0.6, 3, 10) == pytest.approx(1 - 0.4**0.3)
    assert ramp_ratio("linear", 0.6, 3, 10) == pytest.approx(0.18)
    assert [ramp_ratio("exp", 0.6, k, 10) for k in (-1, 0, 10, 12)] == [0.0, 0.0, 0.6, 0.6]


def _callback(model, **kwargs):
    """A set-up SMCP callback on ``model`` without training (groups traced, keeps all True)."""
    pruning = SoftMaskChannelPruning(**{"sparsity": 0.5, "round_to": 1, "log_sparsity": False, **kwargs})
    trainer = pl.Trainer(max_steps=40, callbacks=[pruning], **QUIET)
    pruning.setup(trainer, model, "fit")
    pruning.keeps = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in pruning.groups}
    return pruning


@pytest.mark.parametrize("importance", ["weight", "taylor_fo", "taylor_so"])
def test_channel_scores_equal_hand_computations(importance):
    torch.manual_seed(0)
    model = Tiny()
    pruning = _callback(model, importance=importance)
    model(torch.randn(8, 16)).square().sum().backward()
    pruning.keeps["fc1"][:5] = False  # fc1's rows 0-4 are masked: they do not count in the conv channels' scores
    w, g = model.fc1.weight.detach(), model.fc1.weight.grad
    imp = {"weight": w.abs(), "taylor_fo": -w * g, "taylor_so": -w * g + 0.5 * w.square() * g.square()}[importance]
    expected = imp[5:].view(27, 8, 14).sum((0, 2)).abs().double()  # conv channel c = fc1 columns 14c .. 14c + 13
    assert torch.allclose(pruning.step_scores(None)["conv"], expected)
    expected_fc1 = {"weight": model.fc2.weight.abs(), "taylor_fo": -model.fc2.weight * model.fc2.weight.grad}.get(
        importance, -model.fc2.weight * model.fc2.weight.grad + 0.5 * (model.fc2.weight * model.fc2.weight.grad) ** 2
    )
    assert torch.allclose(pruning.step_scores(None)["fc1"], expected_fc1.detach().sum(0).abs().double())


def test_optimizer_moments_as_the_gradient_source():
    torch.manual_seed(0)
    model = Tiny("adam", lr=0.01)
    pruning = _callback(model, importance="taylor_so", source="optimizer")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).square().sum().backward()
    optimizer.step()
    state = optimizer.state[model.fc2.weight]
    w = model.fc2.weight.detach()
    expected = (-w * state["exp_avg"] + 0.5 * w.square() * state["exp_avg_sq"]).sum(0).abs().double()
    assert torch.allclose(pruning.step_scores(optimizer)["fc1"], expected)


def test_a_dropped_channel_returns_when_its_score_rises_and_the_budget_holds():
    model = Tiny()
    pruning = _callback(model, cost="params")
    scores = {g.name: torch.arange(g.channels, 0, -1).double() for g in pruning.groups}
    first = pruning.solve(0.3, scores)
    group = next(n for n, k in first.items() if not bool(k.all()))
    dropped = int((~first[group]).nonzero()[0])
    pruning.keeps = first
    scores[group][dropped] = 1e6  # now the most important channel
    second = pruning.solve(0.3, scores)
    assert not first[group][dropped] and second[group][dropped]
    for keeps in (first, second):
        assert pruning._fresh_cost(keeps).removed_fraction() >= 0.3


def _soft_phase(pruning) -> bool:
    return not pruning.hard and not all(bool(k.all()) for k in pruning.keeps.values())


class DenseBefore(pl.Callback):
    """Runs before SMCP: the dense weights at the start of each step, and after it whether masked ones changed."""

    def __init__(self, pruning):
        self.pruning, self.changed, self.dense = pruning, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.dense = (
            {n: p.detach().clone() for n, p in pl_module.named_parameters()} if _soft_phase(self.pruning) else None
        )

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.dense is not None and _soft_phase(self.pruning):
            params = dict(pl_module.named_parameters())
            masks = self.pruning._soft_masks()
            self.changed.append(
                all(not torch.equal(params[n].detach()[~m], self.dense[n][~m]) for n, m in masks.items() if not m.all())
            )


class SeenByForward(pl.Callback):
    """Runs after SMCP's hook: the weights the forward pass will see, and exact zeros once the masks are hard."""

    def __init__(self, pruning):
        self.pruning, self.masked_to_zero, self.violations = pruning, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if _soft_phase(self.pruning):
            params = dict(pl_module.named_parameters())
            masks = self.pruning._soft_masks()
            self.masked_to_zero.append(all(not params[n].detach()[~m].any() for n, m in masks.items()))

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.pruning.hard:
            params = dict(pl_module.named_parameters())
            masks = channel_masks(self.pruning.groups, self.pruning.keeps, {n: p.shape for n, p in params.items()})
            self.violations += [n for n, m in masks.items() if params[n].detach()[~m].any()]


def test_soft_masks_keep_masked_channels_learning_then_harden_to_exact_zeros():
    torch.manual_seed(0)
    model = Tiny("sgd", lr=0.05)  # no momentum, no decay: a masked weight can only move by its straight-through grad
    pruning = SoftMaskChannelPruning(0.5, round_to=1, start=2, end=20, every=3, pruned_decay=0.0, log_sparsity=False)
    before, after = DenseBefore(pruning), SeenByForward(pruning)
    pl.Trainer(max_epochs=4, callbacks=[before, pruning, after], **QUIET).fit(model, tiny_loader())
    assert len(after.masked_to_zero) >= 10 and all(after.masked_to_zero)  # the forward saw w * m
    assert len(before.changed) >= 10 and all(before.changed)  # masked channels' dense weights kept learning
    assert pruning.hard and after.violations == []
    assert set(masks_of(model)) and pruning.removed_fraction >= 0.5
    params = dict(model.named_parameters())
    for name, mask in masks_of(model).items():
        assert not params[name].detach()[~mask].any(), name


def test_resume_mid_ramp_equals_an_uninterrupted_run(tmp_path):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("adam", lr=0.01)
        model.example_input_array = torch.zeros(2, 16)
        pruning = SoftMaskChannelPruning(
            0.5, importance="taylor_fo", round_to=1, start=2, end=26, every=3, log_sparsity=False
        )
        trainer = pl.Trainer(
            max_epochs=4,
            callbacks=[pruning, *callbacks],
            default_root_dir=root,
            **{**QUIET, "enable_checkpointing": True},
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, pruning

    straight, straight_pruning = fit(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(tmp_path / "b", [ckpt, StopAfter(2)])
    probe = ResumeProbe()
    resumed, pruning = fit(tmp_path / "c", [probe], ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")  # step 16, mid-ramp
    assert probe.steps == 16
    for name, keep in straight_pruning.keeps.items():
        assert torch.equal(keep, pruning.keeps[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_input():
    with pytest.raises(ValueError, match="`importance` must be one of"):
        SoftMaskChannelPruning(importance="taylor")
    with pytest.raises(ValueError, match="`ramp` must be one of"):
        SoftMaskChannelPruning(ramp="cubic")
    with pytest.raises(ValueError, match="`pruned_decay` must be a number in"):
        SoftMaskChannelPruning(pruned_decay=-1)
