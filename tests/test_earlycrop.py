"""EarlyCroP: the CroP score against finite differences and an explicit Hessian, the trigger, the iterative
steps, structured compaction during fit, resume, the learning-rate restart and bad input."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from test_gradual import StopAfter
from torch import nn

from sparse_lightning import EarlyCroP, compact, masks_of
from sparse_lightning.core.crop import crop_scores, hessian_gradient_product, iterative_targets, settled
from sparse_lightning.core.masks import MaskSet


def _tiny_problem(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    data = [(torch.randn(5, 3, dtype=dtype), torch.randint(0, 2, (5,))) for _ in range(3)]

    def loss(b, model=net):
        x, y = data[b]
        return nn.functional.cross_entropy(model(x), y)

    return net, data, loss


def test_hessian_gradient_product_matches_finite_differences_of_the_gradient():
    net, data, loss = _tiny_problem()
    params = list(net.parameters())
    masks = [torch.rand_like(p) > 0.3 for p in params]
    g_bar, hg = hessian_gradient_product(loss, 3, params, masks)
    direction = [g * m for g, m in zip(g_bar, masks, strict=True)]

    def total_gradient(shift):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
        grads = [torch.zeros_like(p) for p in params]
        for b in range(3):
            for total, g in zip(grads, torch.autograd.grad(loss(b), params), strict=True):
                total += g
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        return grads

    eps = 1e-5
    plus, minus = total_gradient(eps), total_gradient(-eps)
    for h, a, b in zip(hg, plus, minus, strict=True):
        assert torch.allclose(h, (a - b) / (2 * eps), atol=1e-8), (h, (a - b) / (2 * eps))
    assert all(h.abs().sum() > 0 for h in hg)


def test_score_equals_theta_times_an_explicitly_formed_hessian():
    net, data, loss = _tiny_problem()
    names = [n for n, _ in net.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def total_loss(vector):
        pieces, offset = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            pieces[n] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return sum(loss(b, lambda x: torch.func.functional_call(net, pieces, (x,))) for b in range(3))

    hessian = torch.autograd.functional.hessian(total_loss, flat)
    gradient = torch.autograd.functional.jacobian(total_loss, flat)
    expected = (flat * (hessian @ gradient)).abs()
    _, hg = hessian_gradient_product(loss, 3, list(net.parameters()))
    scores = crop_scores(dict(net.named_parameters()), dict(zip(names, hg, strict=True)))
    assert torch.allclose(torch.cat([scores[n].flatten() for n in names]), expected, atol=1e-10)


def test_iterative_targets_follow_the_reference_and_end_exactly_at_the_target():
    assert iterative_targets(0.9, 3) == pytest.approx([0.5, 0.7, 0.8, 0.85, 0.9])
    assert iterative_targets(0.4, 2) == pytest.approx([0.25, 0.325, 0.3625, 0.4])
    assert iterative_targets(0.2, 100) == [0.2]
    steps = iterative_targets(0.98, 100)
    assert len(steps) == 102 and steps[-1] == 0.98 and steps == sorted(steps)


@pytest.mark.parametrize(
    ("distances", "factor", "fires_at"),
    [
        ([0.20, 0.30, 0.35, 0.36], 0.1, 3),  # steps 0.1, 0.05, 0.01 against tau 0.02: fires at the 4th distance
        ([0.20, 0.30, 0.40, 0.50, 0.60], 0.1, None),  # still moving: never fires
        ([0.20, 0.20], 0.0, None),  # tau 0 (structured at 90% and above) never fires
        ([0.01, 0.011], 0.5, 1),  # the first distance itself never fires (d_0 = 0)
    ],
)
def test_trigger_on_synthetic_distance_curves(distances, factor, fires_at):
    fired = [t for t in range(len(distances)) if settled(distances[: t + 1], factor)]
    assert (fired[0] if fired else None) == fires_at


class Fingerprints(pl.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        (crop,) = [c for c in trainer.callbacks if isinstance(c, EarlyCroP)]
        if crop.pruned_epoch >= 0:
            self.after.append(MaskSet.of(pl_module).fingerprints())


def _fit(root=None, epochs=5, callbacks=(), ckpt_path=None, structured=False, **kwargs):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    model.example_input_array = torch.zeros(2, 16)
    defaults = {"batches": 2, "prune_at": "3ep", "log_sparsity": False}
    crop = EarlyCroP(**{"sparsity": 0.5 if structured else 0.9, "structured": structured, **defaults, **kwargs})
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[crop, *callbacks],
        default_root_dir=root,
        **{**QUIET, "enable_checkpointing": root is not None},
    )
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, crop, trainer


def test_unstructured_event_reaches_the_target_exactly_and_masks_never_change_after():
    probe = Fingerprints()
    model, crop, _ = _fit(callbacks=[probe])
    assert crop.pruned_epoch == 2 and crop.trigger == "prune_at"
    total = sum(m.numel() for m in masks_of(model).values())
    zeros = sum(int((~m).sum()) for m in masks_of(model).values())
    assert zeros == round(0.9 * total)
    params = dict(model.named_parameters())
    assert all(not params[n].detach()[~m].any() for n, m in masks_of(model).items())
    first = probe.after[0]
    assert len(probe.after) == 16
    assert all(torch.equal(f[n], first[n]) for f in probe.after for n in first)
    assert 1 < crop.rescorings < 101  # steps that would prune nothing more are skipped


def test_the_trigger_fires_before_prune_at_on_a_settling_run():
    _, crop, _ = _fit(epochs=8, prune_at="7ep", sparsity=0.5)  # tau = d_1 x 0.5
    assert crop.trigger == "trigger" and crop.pruned_epoch < 6
    assert settled(crop.distances, 0.5) and not any(
        settled(crop.distances[:t], 0.5) for t in range(1, len(crop.distances))
    )


def test_a_run_that_ends_before_the_trigger_and_prune_at_still_ends_at_its_target():
    model, crop, _ = _fit(epochs=3, prune_at="100ep")
    assert crop.trigger == "end of training" and crop.pruned_epoch == 2
    assert MaskSet.of(model).sparsity(crop.names) == pytest.approx(0.9, abs=1e-3)


def test_structured_event_compacts_the_model_and_every_parameter_keeps_training():
    class Changes(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    changes = Changes()
    model, crop, trainer = _fit(structured=True, callbacks=[changes])
    assert crop.pruned_epoch == 2 and crop.removed_fraction >= 0.5
    assert model.conv.weight.shape[0] < 8 and model.fc1.weight.shape[0] < 32  # really smaller
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert id(p) in optimized, name
        assert not torch.equal(p.detach(), changes.start[name]), f"{name} did not train in the last epoch"


def test_structured_outputs_equal_before_and_after_compaction():
    masked, masked_crop, _ = _fit(structured=True, epochs=3, compact_during_fit=False)
    compacted, _, _ = _fit(structured=True, epochs=3, compact_during_fit=True)
    assert masked.conv.weight.shape[0] == 8 and compacted.conv.weight.shape[0] < 8
    x = torch.randn(16, 16)
    masked.eval(), compacted.eval()
    with torch.no_grad():
        assert torch.allclose(masked(x), compacted(x), atol=1e-5)
        assert torch.allclose(compact(masked, x)[0](x), compacted(x), atol=1e-5)


@pytest.mark.parametrize(
    ("structured", "stop", "kwargs"),
    [(False, 2, {}), (False, 4, {"restart_lr": True}), (True, 2, {}), (True, 4, {"restart_lr": True})],
    ids=["before-event", "after-event-restart-lr", "structured-before", "structured-after-restart-lr"],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, structured, stop, kwargs):
    straight, straight_crop, _ = _fit(tmp_path / "a", epochs=6, structured=structured, **kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit(tmp_path / "b", epochs=6, callbacks=[ckpt, StopAfter(stop)], structured=structured, **kwargs)
    path = tmp_path / "ckpt" / f"epoch={stop - 1}.ckpt"
    resumed, crop, trainer = _fit(tmp_path / "c", epochs=6, ckpt_path=path, structured=structured, **kwargs)
    assert crop.pruned_epoch == straight_crop.pruned_epoch == 2 and crop.distances == straight_crop.distances
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if kwargs.get("restart_lr"):
        assert type(trainer.lr_scheduler_configs[0].scheduler).__name__ == "OneCycleLR"


def test_bad_input():
    with pytest.raises(ValueError, match="`sparsity` must lie in"):
        EarlyCroP(1.2)
    with pytest.raises(ValueError, match="`batches` must be"):
        EarlyCroP(batches=0)
    with pytest.raises(ValueError, match="`cost` is for `structured=True`"):
        EarlyCroP(cost="params")
    with pytest.raises(TypeError, match="`restart_lr` must be a bool"):
        EarlyCroP(restart_lr="yes")
    with pytest.raises(ValueError, match="`prune_at`"):
        EarlyCroP(prune_at="soon")
    with pytest.raises(ValueError, match=r"`batches`=9 training batches, but an epoch has only 8"):
        _fit(batches=9)

    class Manual(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="under manual optimization"):
        pl.Trainer(max_epochs=1, callbacks=[EarlyCroP()], **QUIET).fit(Manual(), tiny_loader())


def test_distance_and_event_reach_the_logger(tmp_path):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    crop = EarlyCroP(0.9, batches=2, prune_at="3ep")
    trainer = pl.Trainer(max_epochs=4, callbacks=[crop], **{**QUIET, "logger": CSVLogger(tmp_path)})
    trainer.fit(model, tiny_loader())
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    distances = [float(r["earlycrop/distance"]) for r in rows if r.get("earlycrop/distance")]
    assert distances == pytest.approx(crop.distances)
    assert [float(r["earlycrop/pruned_epoch"]) for r in rows if r.get("earlycrop/pruned_epoch")] == [2.0]
