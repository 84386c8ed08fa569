"""The Hessian's spectral radius: power iteration against an explicit Hessian, its gradient against finite
differences, the Kronecker-factored estimate and its penalty against explicit Kronecker products built from
per-sample gradients, and neuron pruning (saliency against the explicit quadratic form, whole neurons of exact zeros,
resume)."""

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
from sparse_lightning.callbacks.spectral import SpectralNeuronPruning
from sparse_lightning.core.spectral import (
    kronecker_factors,
    kronecker_radius,
    layer_rows,
    output_rows,
    spectral_radius,
    spectral_radius_gradient,
)


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


class ConvNet(nn.Module):
    """Conv1d (padding 1) -> tanh -> Linear -> tanh -> Linear on [batch, 6] inputs, float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.fc1 = nn.Linear(18, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x.unsqueeze(1)).tanh().flatten(1)
        return self.fc2(self.fc1(h).tanh())


def _conv_problem():
    torch.manual_seed(0)
    return ConvNet().double(), torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))


def _explicit_factors(net, x, y):
    """Per layer, A = mean_i sum_t a a^T and G = mean_i mean_t g g^T from one forward per sample (the per-sample
    loss's gradient at the layer's output; a convolution's patches cut out by hand, bias column appended)."""
    layers = {"conv": net.conv, "fc1": net.fc1, "fc2": net.fc2}
    sums, seen = {n: [0, 0] for n in layers}, {}
    for i in range(len(x)):
        handles = [
            layer.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
            for n, layer in layers.items()
        ]
        loss = nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [seen[n][1] for n in layers])
        for n, g in zip(layers, grads, strict=True):
            inputs = seen[n][0][0]
            if n == "conv":
                padded = nn.functional.pad(inputs, (1, 1))
                rows = [padded[:, t : t + 3].flatten() for t in range(inputs.shape[-1])]
                outs = [g[0, :, t] for t in range(g.shape[-1])]
            else:
                rows, outs = [inputs], [g[0]]
            rows = [torch.cat([r, torch.ones(1, dtype=r.dtype)]) for r in rows]
            sums[n][0] = sums[n][0] + sum(torch.outer(r, r) for r in rows)
            sums[n][1] = sums[n][1] + sum(torch.outer(o, o) for o in outs) / len(outs)
    return {n: (a / len(x), g / len(x)) for n, (a, g) in sums.items()}


def _explicit_kfac_rho(net, x, y):
    factors = _explicit_factors(net, x, y)
    return max(float(torch.linalg.eigvalsh(torch.kron(a, g).detach())[-1]) for a, g in factors.values())


def test_kronecker_factors_and_radius_match_per_sample_sums_and_the_explicit_kronecker_product():
    net, x, y = _conv_problem()
    explicit = _explicit_factors(net, x, y)
    seen = {}
    for name in ("conv", "fc1", "fc2"):
        getattr(net, name).register_forward_hook(lambda m, args, out, n=name: seen.__setitem__(n, (args[0], out)))
    loss = nn.functional.cross_entropy(net(x), y)  # the batch mean, as a training step's
    grads = torch.autograd.grad(loss, [seen[n][1] for n in ("conv", "fc1", "fc2")])
    for name, grad in zip(("conv", "fc1", "fc2"), grads, strict=True):
        layer = getattr(net, name)
        a, g = kronecker_factors(layer_rows(layer, seen[name][0]), output_rows(layer, grad), len(x), bias=True)
        torch.testing.assert_close(a, explicit[name][0])
        torch.testing.assert_close(g, explicit[name][1])
        expected = float(torch.linalg.eigvalsh(torch.kron(a, g))[-1])
        assert float(kronecker_radius(a, g)) == pytest.approx(expected, rel=1e-10)


def test_on_one_sample_the_kronecker_radius_is_the_squared_norm_of_the_weight_gradient():
    """For one sample the Fisher block of [W b] is exactly (a a^T) (x) (g g^T), of radius |dL/d[W b]|^2."""
    net, x, y = _problem()
    layer, seen = net[2], {}
    layer.register_forward_hook(lambda m, args, out: seen.update(inputs=args[0], out=out))
    loss = nn.functional.cross_entropy(net(x[:1]), y[:1])
    grad_out, grad_w, grad_b = torch.autograd.grad(loss, [seen["out"], layer.weight, layer.bias])
    a, g = kronecker_factors(layer_rows(layer, seen["inputs"]), output_rows(layer, grad_out), 1, bias=True)
    squared = float(grad_w.square().sum() + grad_b.square().sum())
    assert float(kronecker_radius(a, g)) == pytest.approx(squared, rel=1e-10) and squared > 0


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


@pytest.mark.parametrize(
    "pruning", [{}, {"method": "kfac", "sparsity": 0.5, "prune_every": 6}], ids=["regularizer", "neuron_pruning"]
)
def test_resume_equals_an_uninterrupted_run(tmp_path, pruning):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("adam", lr=0.01)
        model.example_input_array = torch.zeros(2, 16)
        spectral = SpectralHessianRegularization(strength=0.05, bound=0.0, every=3, log=False, **pruning)
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
    if pruning:  # the checkpoint (step 16) holds the saliency sums of steps 13-15 (events at steps 12 and 18)
        assert 0 < sum(int((~k).sum()) for k in spectral.keeps.values()) < 40
        assert all(torch.equal(k, straight_spectral.keeps[g]) for g, k in spectral.keeps.items())


def test_bad_input():
    with pytest.raises(ValueError, match="`method` must be one of"):
        SpectralHessianRegularization(method="lanczos")
    with pytest.raises(ValueError, match=r"\['start'\] configure neuron pruning, which runs only with `sparsity` > 0"):
        SpectralHessianRegularization(start=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'boundd'"):
        SpectralHessianRegularization(boundd=3)
    with pytest.raises(ValueError, match="`sparsity` must"):
        SpectralHessianRegularization(sparsity=1.5)
    with pytest.raises(ValueError, match="`cost` must be one of"):
        SpectralHessianRegularization(sparsity=0.5, cost="latency")
    with pytest.raises(ValueError, match="`strength` must be a number >= 0"):
        SpectralHessianRegularization(strength=-1)
    with pytest.raises(ValueError, match="`every` must be"):
        SpectralHessianRegularization(every=0)
    kfac = SpectralHessianRegularization(method="kfac", include=["*"])
    with pytest.raises(ValueError, match="method='kfac' has Kronecker factors .* 'conv.bias' is not one"):
        kfac.regularized(TinyNet())
    grouped = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="method='kfac' needs ungrouped convolutions .* '0' has groups=2"):
        SpectralHessianRegularization(method="kfac").regularized(grouped)


class ConvModule(pl.LightningModule):
    def __init__(self, lr=0.0):
        super().__init__()
        self.net, self.lr = _conv_problem()[0], lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _conv_step(callback, steps=1):
    _, x, y = _conv_problem()
    model = ConvModule()
    before, after = Grads(), Grads()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    pl.Trainer(max_steps=steps, callbacks=[before, callback, after], **QUIET).fit(model, loader)
    return model, x, y, before.grads[0], after.grads[0]


def test_the_kfac_penalty_is_mu_times_the_gradient_of_the_explicit_kronecker_radius():
    spectral = SpectralHessianRegularization(strength=0.5, bound=0.0, method="kfac")
    model, x, y, before, after = _conv_step(spectral)
    net, params = model.net, list(model.net.parameters())
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for p in params]

    def rho_at(shift):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
        value = _explicit_kfac_rho(net, x, y)
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        return value

    assert spectral.rho == pytest.approx(rho_at(0.0), rel=1e-8)
    # only the selected weights receive the penalty: compare along the weights' directions
    weights = [i for i, (n, _) in enumerate(net.named_parameters()) if n.endswith("weight")]
    direction = [d if i in weights else torch.zeros_like(d) for i, d in enumerate(direction)]
    numeric = 0.5 * (rho_at(1e-6) - rho_at(-1e-6)) / 2e-6
    added = float(sum(((a - b) * d).sum() for a, b, d in zip(after, before, direction, strict=True)))
    assert added == pytest.approx(numeric, rel=1e-5) and abs(added) > 1e-6
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(after, before, strict=True)) if i not in weights)


def test_neuron_saliency_is_the_obd_quadratic_form_of_the_kronecker_factored_block(monkeypatch):
    """1/2 delta^T (A (x) G) delta, delta = neuron j's weight row and bias (column-major vec of [W b]), from the
    explicit per-sample factors (lr 0 and one batch: every step sees the same factors)."""
    recorded = []
    original = SpectralNeuronPruning.saliencies
    monkeypatch.setattr(
        SpectralNeuronPruning, "saliencies", lambda self: recorded.append(original(self)) or recorded[-1]
    )
    spectral = SpectralHessianRegularization(strength=0.01, sparsity=0.3, start=1, end=2, prune_every=5)
    model, x, y, _, _ = _conv_step(spectral, steps=3)
    assert isinstance(spectral, SpectralNeuronPruning) and len(recorded) == 2  # events at steps 1 and 2
    net, explicit = _conv_problem()[0], _explicit_factors(_conv_problem()[0], x, y)
    for group, layer_name in (("net.conv", "conv"), ("net.fc1", "fc1")):
        layer = getattr(net, layer_name)
        a, g = explicit[layer_name]
        full = torch.cat([layer.weight.detach().flatten(1), layer.bias.detach()[:, None]], dim=1)
        block = torch.kron(a, g)
        expected = []
        for j in range(full.shape[0]):
            delta = torch.zeros_like(full)
            delta[j] = full[j]
            vec = delta.T.flatten()
            expected.append(0.5 * float(vec @ block @ vec))
        name = next(k for k in recorded[-1] if k.startswith(group))
        torch.testing.assert_close(recorded[-1][name], torch.tensor(expected, dtype=torch.float64))
    assert spectral.removed_fraction == pytest.approx(3 / 7)  # at least 0.3 of the 7 neurons
    scores = torch.cat([recorded[-1][g] for g in spectral.keeps])
    kept = torch.cat([spectral.keeps[g] for g in spectral.keeps])
    assert scores[~kept].max() < scores[kept].min()  # the lowest saliencies leave, ranked across layers


@pytest.mark.parametrize("method", ["hvp", "kfac"])
def test_pruned_neurons_are_whole_rows_and_columns_of_exact_zeros(method):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.1)
    model.example_input_array = torch.zeros(2, 16)
    spectral = SpectralHessianRegularization(
        strength=0.01, bound=0.0, every=4, method=method, sparsity=0.8, end=0.5, prune_every=4, log=False
    )
    pl.Trainer(max_epochs=4, callbacks=[spectral], **QUIET).fit(model, tiny_loader())
    keeps = spectral.keeps
    assert sum(int((~k).sum()) for k in keeps.values()) == 32  # 0.8 of the 8 + 32 neurons: some conv channels too
    conv, fc1 = ~keeps["conv"], ~keeps["fc1"]
    assert conv.any() and fc1.any()
    assert not model.conv.weight[conv].any() and not model.conv.bias[conv].any()
    assert not model.bn.weight[conv].any() and not model.bn.bias[conv].any()
    assert not model.fc1.weight.view(32, 8, 14)[:, conv].any()
    assert not model.fc1.weight[fc1].any() and not model.fc1.bias[fc1].any() and not model.fc2.weight[:, fc1].any()
    assert model.fc1.weight[~fc1][:, keeps["conv"].repeat_interleave(14)].all()  # kept neurons stay dense


def test_neuron_pruning_is_built_from_a_config_with_every_argument_given():
    """LightningCLI and recipes pass every argument of the regularizer's signature, the unset ones as None."""
    unset = dict.fromkeys(("cost", "round_to", "start", "end", "prune_every", "curve", "compact_during_fit"))
    pruning = SpectralHessianRegularization(0.01, sparsity=0.5, **unset)
    assert isinstance(pruning, SpectralNeuronPruning) and isinstance(pruning, SpectralHessianRegularization)
    assert (pruning.cost, pruning.round_to, pruning.curve, pruning.compact_during_fit) == (
        "channels",
        1,
        "cubic",
        False,
    )
    assert type(SpectralHessianRegularization(0.01, sparsity=0.0, **unset)) is SpectralHessianRegularization
