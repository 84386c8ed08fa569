"""CUDA-only checks (marked ``cuda``; skipped without a GPU). ``benchmarks/gpu_check.py`` runs them on a GPU
machine together with the CUDA measurements."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyNet, tiny_loader
from test_training_loops import INF_STEP, ExactZeros, InfAtOneStep, StepRecorder
from torch import nn

from sparse_lightning import GradualMagnitudePruning, MFACPreconditioner, RigL, masks_of
from sparse_lightning.mfac import SlidingInverseFisher, StaticInverseFisher

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = {
    "accelerator": "cuda",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def test_fp16_amp_step_skipped_by_the_grad_scaler_keeps_masks_and_zeros():
    torch.manual_seed(0)
    gmp = GradualMagnitudePruning(sparsity=0.6, include=["fc1.weight"], start=1, end=6, every=2, log_sparsity=False)
    rigl = RigL(sparsity=0.5, include=["fc2.weight"], start=INF_STEP, end=7, every=4, log_sparsity=False)
    recorder, zeros = StepRecorder(), ExactZeros()
    trainer = pl.Trainer(max_steps=8, precision="16-mixed", callbacks=[gmp, rigl, recorder, zeros], **CUDA)
    with pytest.warns(UserWarning, match="not finite"):
        trainer.fit(InfAtOneStep(), tiny_loader())
    before, after, masks = recorder.weights[INF_STEP - 1], recorder.weights[INF_STEP], recorder.masks
    for name in before:
        expected = before[name] * masks[INF_STEP][name] if name in masks[INF_STEP] else before[name]
        assert torch.equal(expected, after[name]), f"{name} changed on the skipped step"
    assert torch.equal(masks[INF_STEP]["fc2.weight"], masks[INF_STEP - 1]["fc2.weight"])
    assert rigl.last_update_step == INF_STEP + 1
    assert zeros.checks == 7


def test_sliding_window_on_cuda_matches_float64_on_the_cpu():
    d, m, damp = 20_000, 64, 1e-5
    stream = torch.randn(m + 5, d, generator=torch.Generator().manual_seed(0)) * (1e6 * damp * m / d) ** 0.5
    window = SlidingInverseFisher(d, m, damp, device="cuda")
    for g in stream[:-1]:
        window.update(g.cuda())
    product = window.update_ihvp(stream[-1].cuda()).cpu().double()
    exact = StaticInverseFisher(stream[-m:].double(), damp)
    assert float((product - exact.ihvp(stream[-1].double())).norm() / product.norm()) < 1e-3
    inside = stream[-3]
    result = window.ihvp(inside.cuda()).cpu().double()
    reference = exact.ihvp(inside.double())
    assert float((result - reference).norm() / reference.norm()) < 1e-3


def test_preconditioned_pruned_training_on_cuda_keeps_exact_zeros():
    torch.manual_seed(0)
    zeros = ExactZeros()
    callbacks = [GradualMagnitudePruning(sparsity=0.8, start=2, end=10, every=2), MFACPreconditioner(16), zeros]
    model = TinyNet("sgd", lr=0.01)
    pl.Trainer(max_epochs=2, callbacks=callbacks, **CUDA).fit(model, tiny_loader())
    assert zeros.checks == 16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_2_4_pruned_linear_runs_on_semi_structured_kernels():
    """pattern="2:4" keeps 2 in every 4 consecutive inputs of each output row: the layout cuSPARSELt takes."""
    from torch.sparse import to_sparse_semi_structured

    class Wide(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8 * 14, 128)
            self.fc2 = nn.Linear(128, 4)

    torch.manual_seed(0)
    model = Wide()
    pruning = GradualMagnitudePruning(sparsity=0.5, pattern="2:4", include=["fc1.weight"], start=0, end=2, every=1)
    pl.Trainer(max_steps=4, callbacks=[pruning], **CUDA).fit(model, tiny_loader())
    weight = model.fc1.weight.detach().half().cuda()
    groups = masks_of(model)["fc1.weight"].view(128, -1, 4).sum(-1)
    assert bool((groups == 2).all())
    sparse = to_sparse_semi_structured(weight[:, :64].contiguous())  # 128 x 64: multiples of the kernel tile
    x = torch.randn(64, 64, device="cuda", dtype=torch.half)
    torch.testing.assert_close(nn.functional.linear(x, sparse), nn.functional.linear(x, weight[:, :64]))


def test_l0_gates_and_the_spectral_penalty_follow_the_module_to_cuda_under_amp():
    """Lightning moves the module to the GPU after the callbacks' ``setup``: the gates, their optimizer state and
    generator must follow; the gates' gradients are unscaled under fp16 AMP."""
    from sparse_lightning import ControlledSparsity, EarlyCroP, SpectralHessianRegularization

    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    l0 = ControlledSparsity(0.7, gate_lr=0.05, dual_lr=0.05, log_sparsity=False)
    pl.Trainer(max_epochs=3, callbacks=[l0], precision="16-mixed", **CUDA).fit(model, tiny_loader())
    assert l0.purged and all(a.is_cuda for a in l0.log_alpha.values())
    params = dict(model.named_parameters())
    assert all(not params[n].detach()[~m].any() for n, m in masks_of(model).items())
    spectral = SpectralHessianRegularization(strength=0.05, bound=0.0, log=False)
    crop = EarlyCroP(0.9, batches=2, prune_at="1ep", log_sparsity=False)
    model = TinyNet("adam", lr=0.01)
    pl.Trainer(max_epochs=2, callbacks=[crop, spectral], **CUDA).fit(model, tiny_loader())
    assert spectral.rho > 0 and crop.pruned_epoch == 0
