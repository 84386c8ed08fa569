from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy

from sparse_lightning import (
    ChannelPruning,
    ConstantMask,
    ControlledSparsity,
    EarlyCroP,
    GradualMagnitudePruning,
    MFACPreconditioner,
    SoftMaskChannelPruning,
    SparsityMonitor,
    SpectralHessianRegularization,
    masks_of,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must lie in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"`sparsity` must lie in \[0, 1\)"),
        ({"sparsity": "0.9"}, r"`sparsity` must be a number"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, r"`initial_sparsity` \(0.6\) must not exceed `sparsity` \(0.5\)"),
        ({"start": 100, "end": 50}, r"`end`=50 \(step 50\) must come after `start`=100 \(step 100\)"),
        ({"start": "3ep", "end": "3ep"}, r"`end`=3ep must come after `start`=3ep"),
        ({"end": 1.5}, r"`end` as a float is a fraction of training and must lie in \(0, 1\]"),
        ({"every": 0}, r"`every` must be >= 1"),
        ({"every": "soon"}, r"`every` must be .*could not parse 'soon'"),
        (
            {"curve": "quartic"},
            r"`curve` must be one of \['constant', 'cosine', 'cubic', 'exponential', 'inverse_cubic', 'linear'\]",
        ),
        ({"distribution": "random"}, r"`distribution` must be one of \['uniform', 'er', 'erk', 'global'\]"),
        ({"pattern": "5:4"}, r"'5:4' is not a valid N:M pattern: need 0 < N < M"),
        ({"pattern": "diagonal"}, r"Unknown `pattern` 'diagonal'. Allowed: 'unstructured', 'channel'"),
        ({"pattern": "2:4", "sparsity": 0.75}, r"`sparsity` 0.75 is more than pattern 2:4 allows \(at most 0.5\)"),
        ({"include": "fc1.weight"}, r"`include` must be a list"),
        ({"overrides": {"fc1.weight": 1.2}}, r"`overrides\['fc1.weight'\]` must lie in \[0, 1\)"),
        ({"min_density": 1.0}, r"`min_density` must lie in \[0, 1\)"),
        ({"log_sparsity": "yes"}, r"`log_sparsity` must be a bool"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GradualMagnitudePruning(**kwargs)


def test_monitor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="`histograms` must be a bool"):
        SparsityMonitor(histograms=1)


class CountSteps(pl.Callback):
    steps = 0

    def on_before_optimizer_step(self, *args):
        CountSteps.steps += 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": ["encoder.*"]}, r"`include` pattern 'encoder.\*' selects no parameter"),
        ({"exclude": ["head.*"]}, r"`exclude` pattern 'head.\*' matches no selected parameter"),
        ({"pattern": "2:4", "sparsity": 0.5}, r"'conv.weight' of shape \(8, 1, 3\) is too small for pattern 2:4"),
        (
            {"pattern": "block:3x4", "include": ["fc2.weight"]},
            r"'fc2.weight' of shape \(4, 32\) does not divide into blocks of 3 outputs x 4 inputs",
        ),
        ({"overrides": {"head.weight": 0.5}}, r"`overrides` pattern 'head.weight' matches no selected parameter"),
        ({"sparsity": 0.99, "min_density": 0.5}, r"can not reach sparsity 0.9900"),
        ({"sparsity": 0.95, "overrides": {"fc1.weight": 0.0}}, r"can not reach sparsity"),
        ({"end": 10_000}, r"`end`=10000 is optimizer step 10000, but training has only 8 steps"),
        ({"start": 0.5, "end": 3}, r"`end`=3 \(step 3\) must come after `start`=0.5 \(step 4\)"),
    ],
)
def test_bad_input_fails_before_the_first_step_and_installs_nothing(kwargs, message):
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CountSteps.steps = 0
    trainer = pl.Trainer(max_epochs=1, callbacks=[GradualMagnitudePruning(**kwargs), CountSteps()], **QUIET)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, tiny_loader())
    assert CountSteps.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if "end" not in kwargs:
        assert masks_of(model) == {}


@pytest.mark.parametrize(
    "strategy", [DeepSpeedStrategy, XLAStrategy, FSDPStrategy, ModelParallelStrategy], ids=lambda c: c.__name__
)
@pytest.mark.parametrize(
    "callback",
    [
        ConstantMask,
        MFACPreconditioner,
        ChannelPruning,
        SoftMaskChannelPruning,
        EarlyCroP,
        ControlledSparsity,
        SpectralHessianRegularization,
    ],
    ids=lambda c: c.__name__,
)
def test_unserved_strategies_are_refused_by_name_at_setup(strategy, callback):
    """Lightning's own classes: DeepSpeed and XLA subclass DDPStrategy and must still be refused.

    The instances are made without ``__init__`` (which needs deepspeed / torch_xla installed): the check reads the
    strategy's type only."""
    trainer = SimpleNamespace(strategy=object.__new__(strategy), callbacks=[])
    with pytest.raises(ValueError, match=f"{callback.__name__} does not support the {strategy.__name__} strategy"):
        callback().setup(trainer, TinyNet(), "fit")


@pytest.mark.parametrize("name", ["ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_ddp_start_methods_are_served(name):
    trainer, model = pl.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False), TinyNet()
    ConstantMask().setup(trainer, model, "fit")
    assert set(masks_of(model)) == {"conv.weight", "fc1.weight", "fc2.weight"}


def test_checkpoint_from_other_selection_is_refused(tmp_path):
    pruning = GradualMagnitudePruning(sparsity=0.5, end=4, every=2, log_sparsity=False)
    model = TinyNet()
    pl.Trainer(max_epochs=1, callbacks=[pruning], **QUIET).fit(model, tiny_loader())
    state = pruning.state_dict()
    other = GradualMagnitudePruning(sparsity=0.5, end=4, every=2, include=["fc1.weight"], log_sparsity=False)
    other.load_state_dict(state)
    trainer = pl.Trainer(max_epochs=1, callbacks=[other], **QUIET)
    with pytest.raises(ValueError, match="masks parameters .* but this callback selects"):
        trainer.fit(TinyNet(), tiny_loader())
