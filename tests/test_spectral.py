"""The Hessian's spectral radius: power iteration against an explicit Hessian, its gradient against finite
differences, and the Kronecker-factored estimate against the explicit Kronecker product."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import StopAfter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparse_lightning import SpectralHessianRegularization
from sparse_lightning.core.spectral import kronecker_radius, spectral_radius, spectral_radius_gradient


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    return net, x, y


def _flat_hessian(net, x, y):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss(vector):
        pieces, offset = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            pieces[n] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, pieces, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def _rho(net, x, y, tolerance=1e-10):
    params = list(net.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    return spectral_radius(grads, params, tolerance=tolerance, max_iterations=5000), grads, params


def test_power_iteration_matches_the_explicit_hessian():
    net, x, y = _problem()
    eigenvalues = torch.linalg.eigvalsh(_flat_hessian(net, x, y))
    expected = float(eigenvalues.abs().max())
    estimate, _, _ = _rho(net, x, y, tolerance=1e-3)
    assert estimate.converged
    assert estimate.rho == pytest.approx(expected, rel=1e-3)


def test_warm_start_from_the_eigenvector_converges_at_once():
    net, x, y = _problem()
    estimate, grads, params = _rho(net, x, y)
    again = spectral_radius(grads, params, start=estimate.vector, tolerance=1e-6)
    assert again.converged and again.iterations <= 3
    assert again.rho == pytest.approx(estimate.rho, rel=1e-6)


def test_the_gradient_of_rho_matches_finite_differences():
    net, x, y = _problem()
    estimate, grads, params = _rho(net, x, y)
    gradient = spectral_radius_gradient(grads, params, estimate)
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-5

    def rho_at(shift):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
        value = _rho(net, x, y)[0].rho
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        return value

    numeric = (rho_at(eps) - rho_at(-eps)) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(gradient, direction, strict=True)))
    assert analytic == pytest.approx(numeric, rel=1e-4)
    assert abs(analytic) > 1e-6


def test_kronecker_radius_equals_the_explicit_kronecker_product():
    torch.manual_seed(0)
    inputs, output_grads = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    a = torch.cat([inputs, torch.ones(32, 1, dtype=torch.float64)], dim=1)
    explicit = torch.kron(a.T @ a / 32, output_grads.T @ output_grads / 32)
    assert kronecker_radius(inputs, output_grads) == pytest.approx(
        float(torch.linalg.eigvalsh(explicit)[-1]), rel=1e-10
    )


class Tiny64(pl.LightningModule):
    """Linear -> Tanh -> Linear in float64 on one fixed batch (so the step's Hessian can be formed explicitly)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Grads(pl.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


def _one_step(**kwargs):
    net, x, y = _problem()
    model = Tiny64()
    model.net.load_state_dict(net.state_dict())
    before, after = Grads(), Grads()
    spectral = SpectralHessianRegularization(
        **{"strength": 0.5, "bound": 0.0, "tolerance": 1e-10, "include": ["*"], **kwargs}
    )  # every parameter, as the explicit Hessian
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    pl.Trainer(max_steps=1, callbacks=[before, spectral, after], **QUIET).fit(model, loader)
    return net, x, y, before.grads[0], after.grads[0], spectral


def test_the_added_gradient_is_mu_times_the_gradient_of_the_explicit_spectral_radius():
    net, x, y, before, after, spectral = _one_step()
    params = list(net.parameters())
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for p in params]

    def rho_at(shift):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
        value = float(torch.linalg.eigvalsh(_flat_hessian(net, x, y)).abs().max())
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        return value

    numeric = 0.5 * (rho_at(1e-5) - rho_at(-1e-5)) / 2e-5
    added = float(sum(((a - b) * d).sum() for a, b, d in zip(after, before, direction, strict=True)))
    assert added == pytest.approx(numeric, rel=1e-4) and abs(added) > 1e-6
    assert spectral.rho == pytest.approx(rho_at(0.0), rel=1e-6)


def test_no_penalty_below_the_bound_and_unconverged_estimates_are_discarded():
    _, _, _, before, after, spectral = _one_step(bound=1e6)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)) and spectral.rho > 0
    _, _, _, before, after, spectral = _one_step(max_iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)) and spectral.unconverged == 1


def test_the_extra_forward_changes_no_running_statistics_and_regularizing_lowers_rho():
    def fit(callbacks):
        torch.manual_seed(0)
        model = TinyNet("sgd", lr=0.1)
        pl.Trainer(max_epochs=8, callbacks=callbacks, **QUIET).fit(model, tiny_loader())
        return model

    plain = fit([])
    idle = fit([SpectralHessianRegularization(strength=1.0, bound=1e9, log=False)])
    for (name, a), (_, b) in zip(plain.state_dict().items(), idle.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm's running statistics included
    regularized = fit([SpectralHessianRegularization(strength=0.05, bound=0.0, every=2, log=False)])

    def rho(model):
        x, y = next(iter(tiny_loader(batch_size=64)))
        params = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
        return spectral_radius(grads, params, tolerance=1e-6, max_iterations=5000).rho

    assert rho(regularized) < 0.8 * rho(plain)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("adam", lr=0.01)
        spectral = SpectralHessianRegularization(strength=0.05, bound=0.0, every=3, log=False)
        trainer = pl.Trainer(
            max_epochs=4,
            callbacks=[spectral, *callbacks],
            default_root_dir=root,
            **{**QUIET, "enable_checkpointing": True},
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, spectral

    straight, straight_spectral = fit(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(tmp_path / "b", [ckpt, StopAfter(2)])
    resumed, spectral = fit(tmp_path / "c", ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert spectral.rho == straight_spectral.rho
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_input():
    with pytest.raises(ValueError, match="`method='kfac'` .* is not built yet"):
        SpectralHessianRegularization(method="kfac")
    with pytest.raises(ValueError, match="Neuron pruning .* is not built yet"):
        SpectralHessianRegularization(sparsity=0.5)
    with pytest.raises(ValueError, match="`strength` must be a number >= 0"):
        SpectralHessianRegularization(strength=-1)
    with pytest.raises(ValueError, match="`every` must be"):
        SpectralHessianRegularization(every=0)
