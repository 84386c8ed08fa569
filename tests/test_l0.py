"""ControlledSparsity: hard-concrete gates, the dual update, purging, the user's state_dict, resume, logging."""

from __future__ import annotations

import copy
import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from test_gradual import StopAfter

from sparse_lightning import ControlledSparsity, compact, masks_of
from sparse_lightning.callbacks.l0 import StructuredControlledSparsity
from sparse_lightning.core.l0 import BETA, GAMMA, ZETA, dual_step, eval_gates, gate_probability, sample_gates


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 1.5, 4.0])
def test_probability_of_an_open_gate_matches_monte_carlo(log_alpha):
    torch.manual_seed(0)
    samples = sample_gates(torch.full((400_000,), log_alpha))
    assert ((samples >= 0) & (samples <= 1)).all()
    assert float((samples > 0).float().mean()) == pytest.approx(
        float(gate_probability(torch.tensor(log_alpha))), abs=3e-3
    )


def test_evaluation_gate():
    values = eval_gates(torch.tensor([-10.0, 0.0, 1.0, 10.0]))
    expected_one = min(1.0, max(0.0, 1 / (1 + math.exp(-1 / BETA)) * (ZETA - GAMMA) + GAMMA))
    assert values.tolist() == pytest.approx([0.0, 0.5 * (ZETA - GAMMA) + GAMMA, expected_one, 1.0])


def test_dual_ascent_reaches_a_toy_constraint_and_restarts():
    """min (x - 2)^2 s.t. x <= 1: the multiplier grows while x > 1 and settles at the KKT value 2."""
    x, multiplier, seen = 3.0, 0.0, []
    for _ in range(3000):
        x -= 0.05 * (2 * (x - 2) + multiplier)
        multiplier = dual_step(multiplier, x - 1, 0.05, restart=False)
        seen.append(multiplier)
    assert x == pytest.approx(1.0, abs=1e-3) and multiplier == pytest.approx(2.0, abs=1e-2)
    assert seen[0] > 0  # violated at once: the multiplier rises
    assert dual_step(2.0, -0.01, 0.05, restart=True) == 0.0  # satisfied: restarted
    assert dual_step(2.0, -0.01, 0.05, restart=False) == pytest.approx(2.0 - 0.0005)
    assert dual_step(0.0001, -1.0, 0.05, restart=False) == 0.0  # projected onto lambda >= 0


def _fit(root=None, epochs=6, callbacks=(), ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    model.example_input_array = torch.zeros(2, 16)  # traced by the structured gates' channel groups
    l0 = ControlledSparsity(**{"sparsity": 0.7, "dual_lr": 0.05, "gate_lr": 0.05, "log_sparsity": False, **kwargs})
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[l0, *callbacks],
        default_root_dir=root,
        **{**QUIET, "enable_checkpointing": root is not None},
    )
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, l0, trainer


def test_gates_close_purge_leaves_exact_zeros_and_the_users_state_dict():
    model, l0, _ = _fit(epochs=20)
    assert l0.purged and l0.expected_density() < 0.5
    masks = masks_of(model)
    assert set(masks) == {"conv.weight", "fc1.weight", "fc2.weight"}
    params = dict(model.named_parameters())
    closed = 0
    for name, mask in masks.items():
        assert not params[name].detach()[~mask].any(), name
        gate = eval_gates(l0.log_alpha[name])
        assert torch.equal(mask, gate > 0), name
        closed += int((~mask).sum())
    assert closed > 0
    assert list(model.state_dict()) == list(TinyNet().state_dict())
    assert "forward" not in model.fc1.__dict__  # the layer's own forward is back


def test_training_forward_sees_gated_weights_and_the_weights_get_the_gated_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    l0 = ControlledSparsity(0.5, log_sparsity=False)
    l0.setup(pl.Trainer(max_epochs=1, **QUIET), model, "fit")
    x = torch.randn(4, 16)
    model.eval()
    gate = eval_gates(l0.log_alpha["fc2.weight"]).detach()
    hidden = model.fc1(model.bn(model.conv(x.unsqueeze(1))).relu().flatten(1)).relu()
    expected = torch.nn.functional.linear(hidden, model.fc2.weight * gate, model.fc2.bias)
    assert torch.allclose(model.fc2(hidden), expected)
    model.train()
    model(x).sum().backward()
    assert l0.log_alpha["fc2.weight"].grad is not None and l0.log_alpha["fc2.weight"].grad.abs().sum() > 0
    l0.teardown(None, model, "fit")
    assert "forward" not in model.fc2.__dict__


@pytest.mark.parametrize("constraint", ["layer", "model"])
def test_the_constraint_is_met_and_the_multipliers_rise_while_violated(constraint):
    class Record(pl.Callback):
        def __init__(self):
            self.multipliers = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            (method,) = [c for c in trainer.callbacks if isinstance(c, ControlledSparsity)]
            self.multipliers.append(dict(method.multipliers))

    record = Record()
    model, l0, _ = _fit(epochs=50, callbacks=[record], constraint=constraint)
    densities = {k: float(d) for k, d in l0.densities().items()}
    assert all(abs(d - 0.3) <= 0.02 for d in densities.values()), densities  # hovering at the boundary
    assert any(v > 0 for step in record.multipliers[:5] for v in step.values())  # violated at the start: rising
    assert len(l0.multipliers) == (3 if constraint == "layer" else 1)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight, straight_l0, _ = _fit(tmp_path / "a", epochs=6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit(tmp_path / "b", epochs=6, callbacks=[ckpt, StopAfter(3)])
    state = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)
    assert list(state["state_dict"]) == list(TinyNet().state_dict())  # the user's keys, plain weights
    resumed, l0, _ = _fit(tmp_path / "c", epochs=6, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    for name, gate in straight_l0.log_alpha.items():
        assert torch.equal(gate, l0.log_alpha[name]), name
    assert l0.multipliers == straight_l0.multipliers
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_expected_and_purged_density_reach_the_logger(tmp_path):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    l0 = ControlledSparsity(0.7, dual_lr=0.05, gate_lr=0.05, constraint="model")
    trainer = pl.Trainer(max_epochs=3, callbacks=[l0], log_every_n_steps=10, **{**QUIET, "logger": CSVLogger(tmp_path)})
    trainer.fit(model, tiny_loader())
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    expected = [float(r["l0/expected_density"]) for r in rows if r.get("l0/expected_density")]
    assert len(expected) == 2 and expected[-1] < expected[0]  # logged every 10 steps: 24 steps
    purged = [float(r["l0/purged_density"]) for r in rows if r.get("l0/purged_density")]
    params = dict(model.named_parameters())
    kept = sum(int(params[n].count_nonzero()) for n in l0.names) / sum(params[n].numel() for n in l0.names)
    assert purged == [pytest.approx(kept)]
    assert any(r.get("l0/multiplier") for r in rows)


def test_bad_input():
    with pytest.raises(ValueError, match="`sparsity` must lie in"):
        ControlledSparsity(1.0)
    with pytest.raises(ValueError, match="`constraint` must be one of"):
        ControlledSparsity(constraint="global")
    with pytest.raises(ValueError, match="`droprate_init` must lie in"):
        ControlledSparsity(droprate_init=0)
    with pytest.raises(ValueError, match="`dual_lr` must be a positive number"):
        ControlledSparsity(dual_lr=0)
    with pytest.raises(TypeError, match="`dual_restarts` must be a bool"):
        ControlledSparsity(dual_restarts=1)
    trainer = pl.Trainer(max_epochs=1, callbacks=[ControlledSparsity(include=["bn.weight"])], **QUIET)
    with pytest.raises(ValueError, match="gates the weights of Linear and Conv layers; 'bn.weight'"):
        trainer.fit(TinyNet(), tiny_loader())


def test_defaults_meet_the_density_within_one_hundredth_on_mnist1d():
    """The paper CNN on MNIST-1D, 100 epochs (4000 steps), target density 0.3 over the model, default rates."""
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    pl.seed_everything(0, verbose=False)
    model = MNIST1DCNN(channels=25)
    l0 = ControlledSparsity(0.7, constraint="model", log_sparsity=False)
    trainer = pl.Trainer(max_epochs=100, callbacks=[l0], check_val_every_n_epoch=10**6, **QUIET)
    trainer.fit(model, datamodule=MNIST1DDataModule(batch_size=100, val_fraction=0.0))
    assert abs(l0.expected_density() - 0.3) <= 0.01
    masks = masks_of(model)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0 < kept < 0.3  # after purging, fewer weights than expected stay (gates with P(open) < 1/2 close)


def test_bf16_mixed_precision_and_gradient_accumulation():
    """Under autocast the gated weight follows the layer's compute dtype; with accumulation the gates step once per
    optimizer step, on the summed gradients."""
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    l0 = ControlledSparsity(0.7, dual_lr=0.05, gate_lr=0.05, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=6, callbacks=[l0], precision="bf16-mixed", accumulate_grad_batches=2, **QUIET)
    trainer.fit(model, tiny_loader())
    assert trainer.global_step == 24 and l0.last_gate_step == 23
    assert l0.purged and l0.expected_density() < 0.8  # 0.83 at initialization (droprate 0.5)
    params = dict(model.named_parameters())
    for name, mask in masks_of(model).items():
        assert mask.dtype == torch.bool and params[name].dtype == torch.float32
        assert not params[name].detach()[~mask].any(), name


def _fit_structured(root=None, epochs=6, callbacks=(), ckpt_path=None, **kwargs):
    structured = {"sparsity": 0.6, "structured": True, "dual_lr": 0.2, "gate_lr": 0.1, **kwargs}
    return _fit(root, epochs, callbacks, ckpt_path, **structured)


def test_structured_gates_act_after_the_norm_and_on_the_neurons():
    """conv's channel gate multiplies the BatchNorm output (before it, training-mode BN would divide it out);
    fc1's gate multiplies fc1's outputs, i.e. fc2's input neurons; one noise draw serves a whole batch."""
    torch.manual_seed(0)
    model = TinyNet()
    model.example_input_array = torch.zeros(2, 16)
    plain = copy.deepcopy(model).eval()
    l0 = ControlledSparsity(0.5, structured=True, log_sparsity=False)
    assert isinstance(l0, StructuredControlledSparsity)
    l0.setup(pl.Trainer(max_epochs=1, **QUIET), model, "fit")
    assert {k: tuple(v.shape) for k, v in l0.log_alpha.items()} == {"conv": (8,), "fc1": (32,)}
    x = torch.randn(4, 16)
    model.eval()
    conv_gate, fc1_gate = (eval_gates(l0.log_alpha[k]).detach() for k in ("conv", "fc1"))
    h = plain.bn(plain.conv(x.unsqueeze(1)))
    h = (h * conv_gate[None, :, None]).relu().flatten(1)
    expected = plain.fc2((plain.fc1(h) * fc1_gate).relu())
    torch.testing.assert_close(model(x), expected)
    model.train()
    l0._draw_noise()
    first = model(x)
    torch.testing.assert_close(model(x), first)  # the same gates within a batch
    first.sum().backward()
    assert all(float(a.grad.abs().sum()) > 0 for a in l0.log_alpha.values())
    l0.teardown(None, model, "fit")
    model.eval()
    assert not torch.allclose(model(x), expected)  # the gates are gone


def test_structured_purge_folds_the_gates_and_removes_whole_channels():
    class Before(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            pl_module.eval()
            self.output = pl_module(x).detach()
            pl_module.train()

    x, before = torch.randn(16, 16), Before()
    model, l0, _ = _fit_structured(epochs=40, callbacks=[before])
    assert l0.purged and abs(l0.expected_density() - 0.4) < 0.05
    keeps = l0.keeps
    conv, fc1 = ~keeps["conv"], ~keeps["fc1"]
    assert conv.any() and fc1.any()
    assert not model.conv.weight[conv].any() and not model.bn.weight[conv].any() and not model.bn.bias[conv].any()
    assert not model.fc1.weight.view(32, 8, 14)[:, conv].any()
    assert not model.fc1.weight[fc1].any() and not model.fc1.bias[fc1].any() and not model.fc2.weight[:, fc1].any()
    assert l0.purged_density() == pytest.approx(float(torch.cat([keeps["conv"], keeps["fc1"]]).float().mean()))
    model.eval()
    torch.testing.assert_close(model(x), before.output)  # folding the evaluation gates changes no output
    small, report = compact(model, torch.zeros(2, 16))
    assert report["groups"] == {"conv": [int(keeps["conv"].sum()), 8], "fc1": [int(keeps["fc1"].sum()), 32]}
    torch.testing.assert_close(small(x), before.output)
    assert list(model.state_dict()) == list(TinyNet().state_dict())


def test_structured_resume_equals_an_uninterrupted_run(tmp_path):
    straight, straight_l0, _ = _fit_structured(tmp_path / "a", epochs=6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit_structured(tmp_path / "b", epochs=6, callbacks=[ckpt, StopAfter(3)])
    resumed, l0, _ = _fit_structured(tmp_path / "c", epochs=6, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    for name, gate in straight_l0.log_alpha.items():
        assert torch.equal(gate, l0.log_alpha[name]), name
    assert l0.multipliers == straight_l0.multipliers
    assert all(torch.equal(k, straight_l0.keeps[g]) for g, k in l0.keeps.items())
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_structured_bad_input():
    with pytest.raises(TypeError, match="`structured` must be a bool, got 'yes'"):
        ControlledSparsity(0.5, structured="yes")
    with pytest.raises(ValueError, match="`constraint` must be one of"):
        ControlledSparsity(0.5, structured=True, constraint="group")
    model = TinyNet()
    model.example_input_array = torch.zeros(2, 16)
    l0 = ControlledSparsity(0.99, structured=True)
    with pytest.raises(ValueError, match="`sparsity` 0.99 of channels can not be reached"):
        l0.setup(pl.Trainer(max_epochs=1, **QUIET), model, "fit")
