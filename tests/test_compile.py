"""Masked training under ``torch.compile`` matches eager, and mask updates do not recompile the model."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader

from sparse_lightning import (
    ChannelPruning,
    EarlyCroP,
    GradualMagnitudePruning,
    SpectralHessianRegularization,
    compact,
    masks_of,
)


def _train(compile_model: bool):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05, momentum=0.9)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=2, end=14, every=3, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **QUIET)
    trainer.fit(torch.compile(model) if compile_model else model, tiny_loader())
    return model


def test_compiled_training_matches_eager_without_recompiles():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    eager = _train(False)
    compiled = _train(True)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # compiled once, not per mask update
    for name, mask in masks_of(eager).items():
        assert torch.equal(mask, masks_of(compiled)[name]), name
        assert torch.all(dict(compiled.named_parameters())[name][~mask] == 0)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _train_channels(compile_model: bool):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05, momentum=0.9)
    model.example_input_array = torch.zeros(2, 16)
    pruning = ChannelPruning(0.5, start=2, end=14, every=3, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **QUIET)
    trainer.fit(torch.compile(model) if compile_model else model, tiny_loader())
    return model, pruning


def test_channel_pruning_of_a_compiled_module_matches_eager_and_compacts_its_own_copy():
    """``Trainer.fit`` compiles the LightningModule's ``forward`` in place; the tracer must see the modules, and a copy
    must not keep calling the original's compiled forward (its outputs would then follow the original's weights)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    eager, eager_pruning = _train_channels(False)
    compiled, pruning = _train_channels(True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for name, keep in eager_pruning.keeps.items():
        assert torch.equal(keep, pruning.keeps[name]), name
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    x = torch.randn(4, 16)
    small, report = compact(compiled, x)
    assert report["max_abs_diff"] < 1e-5 and report["params_after"] < report["params_before"]
    before = small(x).detach().clone()
    with torch.no_grad():
        compiled.fc2.weight.add_(1.0)  # the original changes; the compacted copy must not follow it
    assert torch.equal(small(x), before)


def _train_earlycrop(compile_model: bool):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05, momentum=0.9)
    crop = EarlyCroP(0.8, batches=2, prune_at="1ep", log_sparsity=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[crop], **QUIET)
    trainer.fit(torch.compile(model) if compile_model else model, tiny_loader())
    return model, crop


def test_earlycrop_scores_a_compiled_module_with_its_eager_forward():
    """The double backward of the CroP score can not run through a compiled graph: the score uses the module's own
    forward and gives the eager run's masks."""
    torch._dynamo.reset()
    eager, eager_crop = _train_earlycrop(False)
    compiled, crop = _train_earlycrop(True)
    assert crop.pruned_epoch == eager_crop.pruned_epoch == 0
    for name, mask in masks_of(eager).items():
        assert torch.equal(mask, masks_of(compiled)[name]), name
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "hvp"}, {"method": "kfac"}, {"method": "kfac", "sparsity": 0.5, "end": 0.5, "prune_every": 4}],
    ids=["hvp", "kfac", "neuron_pruning"],
)
def test_the_spectral_penalty_of_a_compiled_module_matches_eager(kwargs):
    """The penalty differentiates the loss two or three times: it runs the module's own eager methods (a compiled
    graph raises 'does not currently support double backward'), and the neuron saliencies' hooks see the compiled
    forward."""

    def train(compile_model: bool):
        torch.manual_seed(0)
        model = TinyNet("sgd", lr=0.05, momentum=0.9)
        model.example_input_array = torch.zeros(2, 16)
        spectral = SpectralHessianRegularization(0.05, bound=0.0, every=4, log=False, **kwargs)
        trainer = pl.Trainer(max_epochs=2, callbacks=[spectral], **QUIET)
        trainer.fit(torch.compile(model) if compile_model else model, tiny_loader())
        return model, spectral

    torch._dynamo.reset()
    eager, eager_spectral = train(False)
    compiled, spectral = train(True)
    assert spectral.rho == pytest.approx(eager_spectral.rho, rel=1e-5) and spectral.rho > 0
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if "sparsity" in kwargs:
        assert all(torch.equal(k, eager_spectral.keeps[g]) for g, k in spectral.keeps.items())
        assert sum(int((~k).sum()) for k in spectral.keeps.values()) > 0
