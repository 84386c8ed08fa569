import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_lightning import ConstantMask, GradualMagnitudePruning, masks_of
from sparse_lightning.core.masks import MaskSet


class ZeroChecker(pl.Callback):
    """After every optimizer step: masked weights exactly 0.0, masks never regrow."""

    def __init__(self):
        self.checks = 0
        self.previous = None

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *_: self._check(pl_module))

    def _check(self, pl_module):
        masks = masks_of(pl_module)
        params = dict(pl_module.named_parameters())
        for name, mask in masks.items():
            assert torch.all(params[name][~mask] == 0.0), name
        if self.previous is not None:
            for name, mask in masks.items():
                assert not torch.any(mask & ~self.previous[name]), f"{name}: pruned weights came back"
        self.previous = {n: m.clone() for n, m in masks.items()}
        self.checks += 1


def global_sparsity(model):
    params = dict(model.named_parameters())
    masks = masks_of(model)
    return sum(int((params[n] == 0).sum()) for n in masks) / sum(params[n].numel() for n in masks)


OPTIMIZERS = [
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-2}),
    ("adam", {}),
    ("adamw", {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(("optimizer", "kwargs"), OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {},
        {"accumulate_grad_batches": 4},
        {"gradient_clip_val": 0.5},
        {"precision": "bf16-mixed"},
        {"precision": "bf16-true"},
    ],
    ids=["plain", "accumulate4", "clip", "bf16-mixed", "bf16-true"],
)
def test_masked_weights_exactly_zero_after_every_step(optimizer, kwargs, trainer_kwargs):
    torch.manual_seed(0)
    model = TinyNet(optimizer, lr=0.01, **kwargs)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=0.1, end=0.75, every=2, log_sparsity=False)
    checker = ZeroChecker()
    trainer = pl.Trainer(max_epochs=6, callbacks=[pruning, checker], **trainer_kwargs, **QUIET)
    trainer.fit(model, tiny_loader())
    assert checker.checks == trainer.global_step > 0
    assert global_sparsity(model) == pytest.approx(0.8, abs=1 / 2000)
    params = dict(model.named_parameters())
    for name, mask in masks_of(model).items():
        state = trainer.optimizers[0].state[params[name]]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert torch.all(value[~mask] == 0), f"{key} of {name} kept state for pruned entries"


class DriftingSGD(torch.optim.SGD):
    """Moves every weight, zero or not: only re-masking after the step keeps pruned weights at zero."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


class DriftNet(TinyNet):
    def configure_optimizers(self):
        return DriftingSGD(self.parameters(), lr=0.01)


def test_other_optimizers_are_re_masked_after_every_step(loader):
    torch.manual_seed(0)
    checker = ZeroChecker()
    pruning = GradualMagnitudePruning(sparsity=0.6, start=2, end=10, every=2, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning, checker], **QUIET)
    trainer.fit(DriftNet(), loader)
    assert checker.checks >= trainer.global_step == 16  # a subclass calling super().step() runs the hooks twice


def test_final_sparsity_is_exact_per_layer_with_uniform(model, loader):
    pruning = GradualMagnitudePruning(sparsity=0.75, end=10, every=3, log_sparsity=False)
    pl.Trainer(max_epochs=2, callbacks=[pruning], **QUIET).fit(model, loader)
    for name, mask in masks_of(model).items():
        assert 1 - mask.float().mean().item() == pytest.approx(0.75, abs=1 / mask.numel()), name


def test_schedule_follows_cubic_curve_between_events(model, loader):
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step] = global_sparsity(pl_module)

    pruning = GradualMagnitudePruning(sparsity=0.9, start=0, end=12, every=4, log_sparsity=False)
    pl.Trainer(max_epochs=2, callbacks=[pruning, Record()], **QUIET).fit(model, loader)
    total = sum(m.numel() for m in masks_of(model).values())
    for step, expected in [(1, 0.0), (5, 0.9 * (1 - (1 - 4 / 12) ** 3)), (9, 0.9 * (1 - (1 - 8 / 12) ** 3)), (13, 0.9)]:
        assert seen[step] == pytest.approx(expected, abs=2 / total), step


def test_biases_and_norms_untouched_and_same_instance_fits_twice(loader):
    pruning = GradualMagnitudePruning(sparsity=0.5, end=6, every=2, log_sparsity=False)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = TinyNet()
        pl.Trainer(max_epochs=1, callbacks=[pruning], **QUIET).fit(model, loader)
        assert sorted(masks_of(model)) == ["conv.weight", "fc1.weight", "fc2.weight"]
        params = dict(model.named_parameters())
        for name in ("conv.bias", "bn.weight", "bn.bias", "fc1.bias", "fc2.bias"):
            assert (params[name] != 0).all(), name
        assert global_sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_two_instances_keep_separate_state_in_checkpoints(tmp_path, model, loader):
    first = GradualMagnitudePruning(sparsity=0.5, end=6, every=2, include=["fc1.weight"], log_sparsity=False)
    second = GradualMagnitudePruning(sparsity=0.8, end=6, every=2, include=["fc2.weight"], log_sparsity=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[first, second], **QUIET)
    trainer.fit(model, loader)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    names = sorted(s["names"][0] for k, s in states.items() if k.startswith("GradualMagnitudePruning"))
    assert names == ["fc1.weight", "fc2.weight"]
    assert 1 - masks_of(model)["fc2.weight"].float().mean() == pytest.approx(0.8, abs=1e-2)


def test_setup_is_idempotent(model, loader):
    pruning = GradualMagnitudePruning(sparsity=0.5, end=6, every=2, log_sparsity=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[pruning], **QUIET)
    trainer.fit(model, loader)
    before = {n: m.clone() for n, m in masks_of(model).items()}
    pruning.setup(trainer, model, "fit")
    assert all(torch.equal(before[n], m) for n, m in masks_of(model).items())
    assert len(MaskSet.of(model)) == 3


def test_constant_mask_fine_tunes_after_gradual_pruning(model, loader):
    pl.Trainer(max_epochs=1, callbacks=[GradualMagnitudePruning(sparsity=0.7, end=6, every=2)], **QUIET).fit(
        model, loader
    )
    pruned = {n: m.clone() for n, m in masks_of(model).items()}
    pl.Trainer(max_epochs=2, callbacks=[ConstantMask()], **QUIET).fit(model, loader)
    params = dict(model.named_parameters())
    for name, mask in pruned.items():
        assert torch.equal(masks_of(model)[name], mask)
        assert (params[name][~mask] == 0).all() and params[name].dtype == torch.float32


def test_constant_mask_keeps_existing_zeros(model, loader):
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0
    zeros = model.fc1.weight == 0
    pl.Trainer(max_epochs=1, callbacks=[ConstantMask(include=["fc1.weight"])], **QUIET).fit(model, loader)
    assert torch.equal(masks_of(model)["fc1.weight"], ~zeros)
    assert (model.fc1.weight[zeros] == 0).all()
    assert (model.fc1.weight[~zeros] != 0).all()


def _fit(tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=3, end=28, every=5, distribution="erk")
    settings = {**QUIET, "enable_checkpointing": True}
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[pruning, *callbacks], default_root_dir=tmp_path, **settings)
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, pruning


class StopAfter(pl.Callback):
    """Ends the run after ``epochs`` epochs, as a crash would (the run was planned for longer)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class ResumeProbe(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_start(self, trainer, pl_module):
        self.masks_at_start = {n: m.clone() for n, m in masks_of(pl_module).items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    straight, _ = _fit(tmp_path / "a", 4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    with pytest.warns(UserWarning, match="before `end`"):
        _fit(tmp_path / "b", 4, callbacks=[ckpt, StopAfter(2)])
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    state = torch.load(path, weights_only=True)
    (pruning_state,) = [v for k, v in state["callbacks"].items() if "GradualMagnitudePruning" in k]
    assert 0 < pruning_state["last_update_step"] < 28
    assert set(state["state_dict"]) == set(TinyNet().state_dict())
    probe = ResumeProbe()
    resumed, _ = _fit(tmp_path / "c", 4, ckpt_path=path, callbacks=[probe])
    assert probe.steps == 16, "the resumed run must continue from step 16, not start over"
    for name, mask in pruning_state["masks"].items():
        assert torch.equal(probe.masks_at_start[name], mask), f"{name}: mask not restored from the checkpoint"
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert global_sparsity(resumed) == pytest.approx(0.8, abs=1e-3)


def test_checkpoint_does_not_make_pruning_permanent(tmp_path):
    """Saving mid-training leaves the run going: the next events still follow the schedule."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    model, pruning = _fit(tmp_path, 4, callbacks=[ckpt])
    assert pruning.last_update_step == 28
    assert global_sparsity(model) == pytest.approx(0.8, abs=1e-3)
