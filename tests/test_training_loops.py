"""Training loops beyond the plain one: AMP steps that a GradScaler skips, manual optimization, two optimizers,
resume of the fixed-mask methods, and dataloaders without a length."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from test_gradual import ResumeProbe, StopAfter, ZeroChecker
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from sparse_lightning import SNIP, GradualMagnitudePruning, RigL, StaticRandomMask, masks_of

INF_STEP = 3


class InfAtOneStep(TinyNet):
    """Its loss is infinite at one batch, so every gradient of that step is inf/NaN and the GradScaler skips it."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == INF_STEP else loss


class ExactZeros(pl.Callback):
    """After every optimizer step the optimizer really takes: masked weights are exactly 0.0."""

    def __init__(self):
        self.checks = 0

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *_: self._check(pl_module))

    def _check(self, pl_module):
        params = dict(pl_module.named_parameters())
        for name, mask in masks_of(pl_module).items():
            assert torch.all(params[name][~mask] == 0.0), name
        self.checks += 1


class StepRecorder(pl.Callback):
    def __init__(self):
        self.weights, self.masks = {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step - 1
        self.weights[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.masks[step] = {n: m.clone() for n, m in masks_of(pl_module).items()}


def fp16_scaler_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_a_step_the_grad_scaler_skips_leaves_masks_and_masked_weights_intact():
    """GMP updates at the skipped step (magnitudes are finite); RigL, which scores gradients, waits one step."""
    torch.manual_seed(0)
    gmp = GradualMagnitudePruning(sparsity=0.6, include=["fc1.weight"], start=1, end=6, every=2, log_sparsity=False)
    rigl = RigL(sparsity=0.5, include=["fc2.weight"], start=INF_STEP, end=7, every=4, log_sparsity=False)
    recorder, zeros = StepRecorder(), ExactZeros()
    trainer = pl.Trainer(max_steps=8, plugins=[fp16_scaler_plugin()], callbacks=[gmp, rigl, recorder, zeros], **QUIET)
    with pytest.warns(UserWarning, match=f"RigL: the gradients at step {INF_STEP} are not finite"):
        trainer.fit(InfAtOneStep(), tiny_loader())
    before, after, masks = recorder.weights[INF_STEP - 1], recorder.weights[INF_STEP], recorder.masks
    for name in before:  # the optimizer did not step: only GMP's event (fc1) zeroed weights
        expected = before[name] * masks[INF_STEP][name] if name in masks[INF_STEP] else before[name]
        assert torch.equal(expected, after[name]), f"{name} changed on the skipped step"
        assert torch.isfinite(after[name]).all(), name
    assert not torch.equal(masks[INF_STEP]["fc1.weight"], masks[INF_STEP - 1]["fc1.weight"]), "GMP's event at step 3"
    assert torch.equal(masks[INF_STEP]["fc2.weight"], masks[INF_STEP - 1]["fc2.weight"]), "RigL must wait"
    assert not torch.equal(masks[INF_STEP + 1]["fc2.weight"], masks[INF_STEP]["fc2.weight"]), "RigL at step 4"
    assert rigl.last_update_step == INF_STEP + 1 and not rigl.deferred_update
    assert zeros.checks == 7  # every step but the skipped one


class ManualNet(TinyNet):
    """Manual optimization; with ``two``, one Adam for the conv and fc1 and another for fc2 (stepped one after the
    other, as GANs do: each step counts as an optimizer step)."""

    def __init__(self, two: bool = False):
        super().__init__("adam", lr=0.01)
        self.two = two
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers() if self.two else [self.optimizers()]
        for opt in optimizers:
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):
        if not self.two:
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        first = [*self.conv.parameters(), *self.bn.parameters(), *self.fc1.parameters()]
        return torch.optim.Adam(first, lr=self.lr), torch.optim.Adam(self.fc2.parameters(), lr=self.lr)


@pytest.mark.parametrize("two", [False, True], ids=["manual", "two-optimizers"])
def test_manual_optimization_and_two_optimizers_are_served(two):
    torch.manual_seed(0)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=2, end=10, every=2, log_sparsity=False)
    zeros = ZeroChecker()
    model = ManualNet(two)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning, zeros], **QUIET)
    trainer.fit(model, tiny_loader())
    steps = 16 * (2 if two else 1)
    assert trainer.global_step == steps and zeros.checks == steps
    assert pruning.last_update_step == 10
    params, masks = dict(model.named_parameters()), masks_of(model)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * sum(m.numel() for m in masks.values()))
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0.0), name
        for opt in trainer.optimizers:
            for value in opt.state.get(params[name], {}).values():
                if value.shape == mask.shape:
                    assert torch.all(value[~mask] == 0), f"{name}: optimizer state of pruned entries"


def _fit_fixed(root, method, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    model = TinyNet("adam", lr=0.01)
    trainer = pl.Trainer(max_epochs=3, default_root_dir=root, callbacks=[method(), *callbacks], **QUIET)
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(
    "method",
    [
        lambda: SNIP(sparsity=0.8, batches=12, log_sparsity=False),  # the checkpoint at step 8 holds 8 gradient sums
        lambda: StaticRandomMask(sparsity=0.8, seed=3, log_sparsity=False),
    ],
    ids=["SNIP", "StaticRandomMask"],
)
def test_resume_of_fixed_mask_methods_equals_an_uninterrupted_run(tmp_path, method):
    straight = _fit_fixed(tmp_path / "a", method)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    settings = {**QUIET, "enable_checkpointing": True}
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[method(), ckpt, StopAfter(1)], **settings)
    trainer.fit(TinyNet("adam", lr=0.01), tiny_loader())
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    torch.load(path, weights_only=True)
    probe = ResumeProbe()
    resumed = _fit_fixed(tmp_path / "c", method, ckpt_path=path, callbacks=[probe])
    assert probe.steps == 16
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    total = sum(m.numel() for m in masks_of(straight).values())
    assert sum(int((~m).sum()) for m in masks_of(resumed).values()) == round(0.8 * total)


class Endless(IterableDataset):
    """A stream without a length."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(16, generator=g)
            yield x, int(x[:4].sum() > 0)


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "message"),
    [
        ({"end": 0.5}, {"max_epochs": 1, "limit_train_batches": None}, None),
        ({"end": 0.5}, {"max_steps": 20}, ""),
        ({"end": "2ep"}, {"max_steps": 20}, r"`end`='2ep' counts epochs, but the training dataloader has no length"),
        ({"end": 12}, {"max_steps": 20}, ""),
    ],
)
def test_a_dataloader_without_length(kwargs, trainer_kwargs, message):
    """Fractions need a known length (``max_steps``), epochs a loader with a length; steps always work."""
    pruning = GradualMagnitudePruning(sparsity=0.5, every=2, log_sparsity=False, **kwargs)
    loader = DataLoader(Endless(), batch_size=8)
    if message is None:  # no max_steps: Lightning itself refuses an endless loader for an epoch-bounded run
        trainer_kwargs = {"max_steps": -1, "max_epochs": -1}
        message = r"`end`=0.5 is a fraction of training, but training has no fixed length"
        trainer = pl.Trainer(callbacks=[pruning], limit_train_batches=None, **{**QUIET, **trainer_kwargs})
    else:
        trainer = pl.Trainer(callbacks=[pruning], **{**QUIET, **trainer_kwargs})
    if message:
        with pytest.raises(ValueError, match=message):
            trainer.fit(TinyNet(), loader)
        assert trainer.global_step == 0
        return
    trainer.fit(TinyNet(), loader)
    assert trainer.global_step == 20
    assert pruning.end_step == (10 if isinstance(kwargs["end"], float) else 12)


def test_resuming_with_another_training_length_says_what_moves(tmp_path):
    """A run planned for 4 epochs (32 steps), resumed from epoch 1 with max_epochs=3 (24 steps): end=0.75 was step
    24 and becomes 18, in one warning naming both lengths. The same length resumes silently."""

    def fit(epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        pruning = GradualMagnitudePruning(sparsity=0.5, start=2, end=0.75, every=4, log_sparsity=False)
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[pruning, *callbacks],
            default_root_dir=tmp_path,
            **{**QUIET, "enable_checkpointing": True},
        )
        trainer.fit(TinyNet(), tiny_loader(), ckpt_path=ckpt_path)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    with pytest.warns(UserWarning, match="before `end`"):
        fit(4, callbacks=[ckpt, StopAfter(2)])
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    message = (
        r"GradualMagnitudePruning: the checkpoint's run was 32 optimizer steps long \(8 an epoch\), this one is 24 "
        r"\(8\); times given as fractions or epochs follow the new length, so its events move from steps 2..24 to "
        r"2..18"
    )
    with pytest.warns(UserWarning, match=message):
        fit(3, ckpt_path=path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpoint's run was")
        fit(4, ckpt_path=path)


def test_a_checkpoint_saved_before_newer_state_was_declared_still_loads(tmp_path):
    """0.1.0 checkpoints have no `deferred_update` or `planned_timeline`: they keep their defaults."""
    torch.manual_seed(0)
    pruning = GradualMagnitudePruning(sparsity=0.5, start=2, end=8, every=2, log_sparsity=False)
    pl.Trainer(max_epochs=1, callbacks=[pruning], **QUIET).fit(TinyNet(), tiny_loader())
    state = pruning.state_dict()
    old = {k: v for k, v in state.items() if k not in ("deferred_update", "planned_timeline")}
    restored = GradualMagnitudePruning(sparsity=0.5, start=2, end=8, every=2, log_sparsity=False)
    restored.load_state_dict(old)
    model = TinyNet()
    pl.Trainer(max_epochs=1, callbacks=[restored], **QUIET).fit(model, tiny_loader())
    for name, mask in state["masks"].items():
        assert torch.equal(masks_of(model)[name], mask), name
