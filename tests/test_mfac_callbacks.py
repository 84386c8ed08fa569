"""M-FAC in the training loop: MFACPreconditioner, MFACPruning and the MFAC optimizer."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import ResumeProbe, StopAfter, ZeroChecker
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparse_lightning import GradualMagnitudePruning, MFACPreconditioner, MFACPruning, masks_of
from sparse_lightning.mfac import MFAC

D, STEPS, BATCH = 20, 300, 16
CURVATURE = torch.logspace(0, 3, D)  # condition number 1000


class Regression(pl.LightningModule):
    """Least squares on x ~ N(0, diag(CURVATURE)) with label noise: an ill-conditioned stochastic quadratic."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.w = nn.Parameter(1.0 / CURVATURE.sqrt())  # the optimum is 0: loss = 1/2 w^T diag(CURVATURE) w + const
        self.excess = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((x @ self.w - y) ** 2).mean()

    def on_train_batch_end(self, *args):
        self.excess.append(0.5 * float((CURVATURE * self.w.detach() ** 2).sum()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, D, generator=g) * CURVATURE.sqrt()
    return DataLoader(TensorDataset(x, 0.1 * torch.randn(STEPS * BATCH, generator=g)), batch_size=BATCH)


def steps_to_tenth(lr: float, callbacks=()) -> int:
    model = Regression(lr)
    pl.Trainer(max_epochs=1, callbacks=list(callbacks), **QUIET).fit(model, regression_loader())
    start = 0.5 * D
    return next((i for i, e in enumerate(model.excess) if e < 0.1 * start), STEPS)


def test_preconditioned_sgd_converges_in_fewer_steps_than_sgd_on_an_ill_conditioned_quadratic():
    """Plain SGD is limited by lr < 2 / 1000; every stable learning rate needs more steps than M-FAC-preconditioned
    SGD (damp set to the gradient scale, as damp 1e-5 is to a network's)."""
    sgd = {lr: steps_to_tenth(lr) for lr in (5e-4, 1e-3, 1.5e-3, 1.9e-3)}
    mfac = steps_to_tenth(1.0, [MFACPreconditioner(num_grads=32, damp=100.0)])
    assert mfac < min(sgd.values()), (mfac, sgd)


def test_masked_coordinates_stay_exactly_zero_with_gradual_pruning():
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    checker, precondition = ZeroChecker(), MFACPreconditioner(num_grads=8, damp=1e-3)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=2, end=20, every=3, log_sparsity=False)
    pl.Trainer(max_epochs=4, callbacks=[pruning, precondition, checker], **QUIET).fit(model, tiny_loader())
    assert checker.checks == 32
    masks, params = masks_of(model), dict(model.named_parameters())
    keep = torch.cat(
        [masks[n].reshape(-1) if n in masks else torch.ones(p.numel(), dtype=torch.bool) for n, p in params.items()]
    )
    window = precondition.fisher.window.reshape(8, -1)[:, : keep.numel()]
    assert torch.all(window[:, ~keep] == 0) and window[:, keep].abs().sum() > 0
    assert torch.equal(precondition.keep, keep)


def test_preconditioner_must_come_after_mask_producing_callbacks():
    callbacks = [MFACPreconditioner(num_grads=4), GradualMagnitudePruning(sparsity=0.5, end=5, every=1)]
    with pytest.raises(ValueError, match="Put MFACPreconditioner after GradualMagnitudePruning"):
        pl.Trainer(max_epochs=1, callbacks=callbacks, **QUIET).fit(TinyNet(), tiny_loader())


class Poison(pl.Callback):
    """Makes the gradient of one step infinite, as an fp16 overflow would."""

    def __init__(self, step):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            pl_module.fc2.weight.grad[0, 0] = float("inf")


def test_a_non_finite_gradient_skips_the_step_and_leaves_the_window_untouched():
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05)
    precondition = MFACPreconditioner(num_grads=4, damp=1e-3)
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = (
                precondition.fisher.state_dict()["window"].clone(),
                {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            )

    trainer = pl.Trainer(max_steps=5, callbacks=[Poison(2), precondition, Snap()], **QUIET)
    with pytest.warns(UserWarning, match="the gradient at step 2 is not finite; the step is skipped"):
        trainer.fit(model, tiny_loader())
    assert precondition.skipped_steps == 1
    window_before, weights_before = snapshots[2]
    window_after, weights_after = snapshots[3]
    assert torch.equal(window_before, window_after)
    assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["preconditioner", "pruning"])
def test_resume_equals_an_uninterrupted_run(tmp_path, method):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("sgd", lr=0.05, momentum=0.9)
        if method == "preconditioner":
            mine = [MFACPreconditioner(num_grads=6, damp=1e-3)]
        else:
            mine = [MFACPruning(sparsity=0.8, start=4, end=28, every=6, num_grads=5, block_size=32, log_sparsity=False)]
        trainer = pl.Trainer(
            max_epochs=4,
            callbacks=[*mine, *callbacks],
            default_root_dir=root,
            **{**QUIET, "enable_checkpointing": True},
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, mine[0]

    straight, _ = fit(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(tmp_path / "b", [ckpt, StopAfter(2)])
    path = tmp_path / "ckpt" / "epoch=1.ckpt"  # step 16: pruning holds 4 of the 5 gradients for its event at 16
    state = torch.load(path, weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if k.startswith("MFAC")]
    if method == "pruning":
        assert saved["filled"] == 4 and saved["grads"][:4].abs().sum() > 0
    probe = ResumeProbe()
    resumed, _ = fit(tmp_path / "c", [probe], ckpt_path=path)
    assert probe.steps == 16
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name


class Quadratic(pl.LightningModule):
    """One linear layer trained to reproduce a fixed target map: its OBS update is visible in the loss."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.fc(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("block_size", [None, 4])  # 4 < 8 gradients: oBERT-style explicit block inverses
def test_mfac_pruning_reaches_the_target_and_obs_moves_the_survivors(block_size):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = x @ torch.randn(16, 8)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = Quadratic()
    before = model.fc.weight.detach().clone()
    pruning = MFACPruning(sparsity=0.5, start=6, end=7, every=10, num_grads=8, block_size=block_size, recomputations=4)
    pl.Trainer(max_steps=8, callbacks=[pruning], **QUIET).fit(model, loader)  # lr 0: only pruning moves weights
    mask = masks_of(model)["fc.weight"]
    after = model.fc.weight.detach()
    assert int((~mask).sum()) == 64 and torch.all(after[~mask] == 0)
    assert not torch.equal(after[mask], before[mask]), "the survivors got no OBS update"
    assert pruning.grads is None, "the gradient buffer is freed after the last event"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_grads": 0}, "`num_grads` must be >= 1"),
        ({"damp": 0}, "`damp` must be a finite number > 0"),
        ({"block_size": -3}, "`block_size` must be >= 1"),
        ({"recomputations": 0}, "`recomputations` must be >= 1"),
    ],
)
def test_mfac_pruning_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFACPruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_grads": 0}, "`num_grads`"), ({"damp": -1.0}, "`damp`"), ({"num_grads": 8, "block_size": 4}, "block_size")],
)
def test_preconditioner_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFACPreconditioner(**kwargs)


def test_mfac_optimizer_follows_the_reference_update_rule_and_resumes():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(30))
    opt = MFAC([w], lr=0.1, momentum=0.5, weight_decay=0.01, num_grads=4, damp=1e-2)
    expected, velocity = w.detach().double().clone(), torch.zeros(30, dtype=torch.float64)
    window = torch.zeros(4, 30, dtype=torch.float64)  # the last 4 gradients, zeros until they have arrived
    targets = torch.randn(6, 30)
    for t in range(6):
        w.grad = (w - targets[t]).detach().clone()
        g = (expected - targets[t]) + 0.01 * expected
        window[t % 4] = g
        fisher = 1e-2 * torch.eye(30, dtype=torch.float64) + window.T @ window / 4
        velocity = 0.5 * velocity + 0.5 * torch.linalg.solve(fisher, g)
        expected -= 0.1 * velocity
        opt.step()
        torch.testing.assert_close(w.detach().double(), expected, atol=1e-5, rtol=1e-5)
    copy = nn.Parameter(w.detach().clone())
    other = MFAC([copy], lr=0.1, momentum=0.5, weight_decay=0.01, num_grads=4, damp=1e-2)
    other.load_state_dict(opt.state_dict())
    for t in (4, 5, 0):
        for p in (w, copy):
            p.grad = (p - targets[t]).detach().clone()
        opt.step()
        other.step()
    assert torch.equal(w, copy)
    w.grad = torch.full((30,), float("nan"))
    opt.step()
    assert opt.skipped_steps == 1 and torch.isfinite(w).all()


def test_mfac_pruning_holds_its_gradient_buffer_only_near_an_event():
    """PITFALLS (sparseml#759): the num_grads x d buffer exists only in the num_grads steps before each event."""
    pruning = MFACPruning(sparsity=0.5, start=12, end=24, every=12, num_grads=3, block_size=None, log_sparsity=False)
    held = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            held[trainer.global_step - 1] = pruning.grads is not None

    torch.manual_seed(0)
    pl.Trainer(max_epochs=4, callbacks=[pruning, Probe()], **QUIET).fit(TinyNet(), tiny_loader())
    assert [s for s, h in held.items() if h] == [10, 11, 22, 23]
