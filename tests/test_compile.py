"""Masked training under ``torch.compile`` matches eager, and mask updates do not recompile the model."""

import lightning.pytorch as pl
import torch
from helpers import QUIET, TinyNet, tiny_loader

from sparse_lightning import GradualMagnitudePruning, masks_of


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
