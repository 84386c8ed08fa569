import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import ResumeProbe, StopAfter

from sparse_lightning import SET, RigL, StaticRandomMask, masks_of
from sparse_lightning.core.distribution import erk_densities
from sparse_lightning.core.growth import cosine_drop_fraction, drop_and_grow


def test_one_update_drops_smallest_and_grows_largest_gradients():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    weight = torch.tensor([0.5, -0.1, 0.3, 0.05, 0, 0, 0, 0])
    grad = torch.tensor([9.0, 0.01, 9.0, 0.01, 0.2, -0.7, 0.1, 0.7])
    new, grown = drop_and_grow(mask, weight, grad, 2)
    assert new.tolist() == [1, 0, 1, 0, 0, 1, 0, 1]  # |g| ties at 0.7: the lower index first
    assert grown.tolist() == [0, 0, 0, 0, 0, 1, 0, 1]
    # a dropped connection with a large gradient comes straight back and is not "new"
    grad = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.2, 0.7, 0.1, 0.7])
    new, grown = drop_and_grow(mask, weight, grad, 2)
    assert new.tolist() == mask.tolist() and not grown.any()


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert cosine_drop_fraction(101, 100, 0.3) == 0.0


class UpdateProbe(pl.Callback):
    """Runs after the method's own hook: records what each mask update did."""

    def __init__(self):
        self.updates, self.before = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: m.clone() for n, m in masks_of(pl_module).items()}
        self.bias_before = pl_module.fc2.bias.detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        after = masks_of(pl_module)
        changed = {n for n in after if not torch.equal(after[n], self.before[n])}
        if changed:
            params = dict(pl_module.named_parameters())
            info = {"step": trainer.global_step, "grads_none": all(p.grad is None for p in pl_module.parameters())}
            for n in after:
                grown = after[n] & ~self.before[n]
                state = optimizer.state.get(params[n], {})
                info[n] = {
                    "active": (int(self.before[n].sum()), int(after[n].sum())),
                    "grown_zero": bool(torch.all(params[n][grown] == 0)),
                    "grown_state_zero": all(
                        bool(torch.all(v[grown] == 0)) for v in state.values() if torch.is_tensor(v) and v.dim()
                    ),
                }
            self.updates.append(info)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.updates and self.updates[-1]["step"] == trainer.global_step - 1 and self.updates[-1]["grads_none"]:
            assert torch.equal(pl_module.fc2.bias, self.bias_before), "the optimizer step was not skipped"


def _train(method, probe=None, **kwargs):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    callbacks = [method(sparsity=0.8, every=4, end=0.6, log_sparsity=False, **kwargs)]
    callbacks += [probe] if probe else []
    trainer = pl.Trainer(max_epochs=5, callbacks=callbacks, **QUIET)
    trainer.fit(model, tiny_loader())
    return model, callbacks[0], trainer


@pytest.mark.parametrize("method", [RigL, SET])
def test_updates_keep_counts_start_grown_at_zero_and_stop_at_end(method):
    probe = UpdateProbe()
    model, callback, trainer = _train(method, probe)
    assert probe.updates, "no mask update happened"
    assert callback.end_step == 24 and all(u["step"] <= 24 for u in probe.updates)
    assert all(u["step"] % 4 == 0 for u in probe.updates)
    for update in probe.updates:
        for name in ("conv.weight", "fc1.weight", "fc2.weight"):
            before, after = update[name]["active"]
            assert before == after, (update["step"], name)
            assert update[name]["grown_zero"] and update[name]["grown_state_zero"]
        assert update["grads_none"] == (method is RigL)
    masks = masks_of(model)
    total = sum(m.numel() for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == round(0.8 * total)
    for name, mask in masks.items():
        assert torch.all(dict(model.named_parameters())[name][~mask] == 0)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    """After an update, every grown connection had a dense gradient at least as large as any it passed over."""
    captured = {}

    class SpyRigL(RigL):
        def compute_masks(self, step, params):
            captured["grad"] = {n: params[n].grad.clone() for n in self.names}
            captured["before"] = {n: self.mask_set[n].clone() for n in self.names}
            out = super().compute_masks(step, params)
            captured["after"] = out
            return out

    torch.manual_seed(0)
    pl.Trainer(
        max_epochs=1,
        callbacks=[
            SpyRigL(sparsity=0.8, start=4, end=5, decay="constant", drop_noise=0.0, log_sparsity=False),
        ],
        **QUIET,
    ).fit(TinyNet("adam"), tiny_loader())
    sparse_layers = [n for n in captured["grad"] if not captured["before"][n].all()]
    assert sparse_layers == ["fc1.weight"]  # ERK keeps the 24-weight conv and the 4-row head dense
    for name in sparse_layers:
        grad, after, before = captured["grad"][name], captured["after"][name], captured["before"][name]
        grown = after & ~before
        candidates = ~after & ~before
        dropped = before & ~after
        assert int(after.sum()) == int(before.sum()), name
        assert 0 < int(grown.sum()) == int(dropped.sum()) <= int(0.3 * int(before.sum())), name
        assert grad[grown].abs().min() >= grad[candidates].abs().max(), name


@pytest.mark.parametrize("method", [RigL, SET])
def test_resume_in_the_middle_of_an_update_period(tmp_path, method):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("adam", lr=0.01)
        dst = method(sparsity=0.8, every=5, end=0.8)
        trainer = pl.Trainer(
            max_epochs=4, callbacks=[dst, *callbacks], default_root_dir=root, **{**QUIET, "enable_checkpointing": True}
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(tmp_path / "b", [ckpt, StopAfter(2)])
    path = tmp_path / "ckpt" / "epoch=1.ckpt"  # step 16: the last update was at 15, the next is at 20
    state = torch.load(path, weights_only=True)
    (dst_state,) = [v for k, v in state["callbacks"].items() if k.startswith(method.__name__)]
    assert dst_state["last_update_step"] == 15
    probe = ResumeProbe()
    resumed = fit(tmp_path / "c", [probe], ckpt_path=path)
    assert probe.steps == 16
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"`alpha` \(the drop fraction\) must lie in \(0, 1\]"),
        ({"alpha": 1.5}, "`alpha`"),
        ({"every": 0}, "`every` must be >= 1"),
        ({"decay": "linear"}, r"`decay` must be one of \['cosine', 'constant'\]"),
        ({"distribution": "random"}, "`distribution` must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RigL(**kwargs)


def test_end_before_the_first_update_fails_before_training():
    with pytest.raises(ValueError, match=r"`end`=3 \(step 3\) must come after `start`=6 \(step 6\)"):
        RigL(start=6, end=3)
    trainer = pl.Trainer(max_epochs=1, callbacks=[RigL(start="1ep", end=3)], **QUIET)
    with pytest.raises(ValueError, match=r"`end`=3 \(step 3\) must come after `start`=1ep \(step 8\)"):
        trainer.fit(TinyNet(), tiny_loader())


def test_rigl_grows_from_the_accumulated_gradient():
    """With accumulate_grad_batches=4 the grow score is the mean gradient of the 4 micro-batches."""
    captured = {}

    class SpyRigL(RigL):
        def compute_masks(self, step, params):
            captured.setdefault("grad", {n: params[n].grad.clone() for n in self.names})
            return super().compute_masks(step, params)

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            captured["model"] = copy.deepcopy(pl_module)

    torch.manual_seed(0)
    rigl = SpyRigL(sparsity=0.8, every=1, end=1, drop_noise=0.0, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=4, callbacks=[rigl, Snapshot()], **QUIET)
    trainer.fit(TinyNet("adam"), tiny_loader())
    model = captured["model"]
    model.zero_grad()
    for i, (x, y) in enumerate(tiny_loader()):
        if i == 4:
            break
        (torch.nn.functional.cross_entropy(model(x), y) / 4).backward()
    params = dict(model.named_parameters())
    for name, grad in captured["grad"].items():
        torch.testing.assert_close(grad, params[name].grad)


class PowersNet(pl.LightningModule):
    """One bias-free Linear with dense gradient r x^T made of distinct 3^a * 2^b: no ties, gaps >= 12%."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(1, 33, dtype=torch.float32).view(4, 8) * 1e-3)

    def training_step(self, batch, batch_idx):
        x, t = batch
        return 0.5 * ((self.fc(x) - t) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _powers_loader():
    x = 2.0 ** torch.arange(8, dtype=torch.float32).view(1, 8)
    weight = torch.arange(1, 33, dtype=torch.float32).view(4, 8) * 1e-3
    t = x @ weight.T - torch.tensor([[1.0, 3.0, 9.0, 27.0]])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, t), batch_size=1)


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_rigl_masks_under_mixed_precision_equal_fp32(precision):
    masks, initial = {}, {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            initial["fc.weight"] = masks_of(pl_module)["fc.weight"].clone()

    for prec in ("32-true", precision):
        model = PowersNet()
        rigl = RigL(sparsity=0.5, every=1, end=1, drop_noise=0.0, distribution="uniform", log_sparsity=False)
        pl.Trainer(max_steps=2, precision=prec, callbacks=[rigl, Initial()], **QUIET).fit(model, _powers_loader())
        masks[prec] = masks_of(model)["fc.weight"].clone()
        assert rigl.last_update_step == 0
    assert not torch.equal(masks["32-true"], initial["fc.weight"]), "the update changed nothing"
    assert torch.equal(masks["32-true"], masks[precision])
    assert int(masks["32-true"].sum()) == 16


class MaskRecorder(pl.Callback):
    def __init__(self):
        self.masks = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.masks.append({n: m.clone() for n, m in masks_of(pl_module).items()})


def test_static_random_mask_is_exact_erk_fixed_and_seeded():
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        model, recorder = TinyNet("adam", lr=0.01), MaskRecorder()
        callback = StaticRandomMask(sparsity=0.8, seed=seed, log_sparsity=False)
        pl.Trainer(max_epochs=2, callbacks=[callback, recorder], **QUIET).fit(model, tiny_loader())
        runs.append(recorder.masks)
        first = recorder.masks[0]
        assert all(torch.equal(m[n], first[n]) for m in recorder.masks for n in first)
        params = dict(model.named_parameters())
        for name, mask in first.items():
            assert torch.all(params[name][~mask] == 0), name
        total = sum(m.numel() for m in first.values())
        assert total - sum(int(m.sum()) for m in first.values()) == round(0.8 * total)
        densities = erk_densities({n: params[n].shape for n in first}, 0.8)
        for name, mask in first.items():
            assert abs(mask.float().mean().item() - densities[name]) <= 1.5 / mask.numel(), name
    same = all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    differs = any(not torch.equal(runs[0][0][n], runs[2][0][n]) for n in runs[0][0])
    assert same and differs
