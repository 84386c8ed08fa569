"""AC/DC: the phase schedule, global magnitude masks in compressed phases, lifted masks and reset momentum in
decompressed ones, ending sparse; resume; bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import StopAfter

from sparse_lightning import ACDC, masks_of

SCHEDULE = {"start": 8, "end": 56, "phase": 8}  # 8 steps an epoch, 10 epochs: compress 8, 24, 40, 56-79


class Watch(pl.Callback):
    """Per optimizer step, after AC/DC's update: weights, masks and SGD momentum (this runs after AC/DC)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = ["conv.weight", "fc1.weight", "fc2.weight"]
        params = dict(pl_module.named_parameters())
        momentum = [optimizer.state[params[n]].get("momentum_buffer") for n in names]
        self.steps.append(
            {
                "step": trainer.global_step,
                "weights": {n: params[n].detach().clone() for n in names},
                "masks": {n: m.clone() for n, m in masks_of(pl_module).items()},
                "momentum": [m.clone() if m is not None else None for m in momentum],
            }
        )


class Before(pl.Callback):
    """The weights AC/DC ranks (this runs before AC/DC)."""

    def __init__(self):
        self.weights = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(callbacks, epochs=10, root=None, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05, momentum=0.9)
    acdc = ACDC(**{"sparsity": 0.9, **SCHEDULE, "log_sparsity": False, **kwargs})
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callbacks[0], acdc, *callbacks[1:]] if callbacks else [acdc],
        default_root_dir=root,
        **{**QUIET, "enable_checkpointing": root is not None},
    )
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, acdc


def test_phases_alternate_compressed_first_and_the_run_ends_sparse():
    before, watch = Before(), Watch()
    model, acdc = _fit([before, watch])
    assert [(e.step, e.kind) for e in acdc.events()] == [
        (8, "compress"),
        (16, "decompress"),
        (24, "compress"),
        (32, "decompress"),
        (40, "compress"),
        (48, "decompress"),
        (56, "compress"),
    ]
    total = sum(p.numel() for p in watch.steps[0]["weights"].values())
    for record in watch.steps:
        step = record["step"]
        sparse = 8 <= step < 16 or 24 <= step < 32 or 40 <= step < 48 or step >= 56
        zeros = sum(int((w == 0).sum()) for w in record["weights"].values())
        if sparse:
            assert zeros == round(0.9 * total), step  # exact, global over the three weights
        else:
            assert all(bool(m.all()) for m in record["masks"].values()), step
    masks = masks_of(model)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)
    assert all(not p[~masks[n]].any() for n, p in model.named_parameters() if n in masks)


def test_compressed_phases_keep_the_global_top_magnitudes_and_dense_phases_restart_pruned_weights_at_zero():
    before, watch = Before(), Watch()
    _fit([before, watch])
    by_step = {r["step"]: r for r in watch.steps}
    for step in (8, 24, 40, 56):
        weights = before.weights[step]
        flat = torch.cat([weights[n].abs().flatten() for n in ("conv.weight", "fc1.weight", "fc2.weight")])
        threshold = flat.sort(descending=True).values[round(0.1 * flat.numel()) - 1]
        for name, mask in by_step[step]["masks"].items():
            assert torch.equal(mask, weights[name].abs() >= threshold), (step, name)
    for step in (16, 32, 48):  # the weights pruned in the phase before start from exactly 0 and then move
        pruned = {n: ~m for n, m in by_step[step - 1]["masks"].items()}
        assert all(not by_step[step]["weights"][n][pruned[n]].any() for n in pruned)
        assert any(by_step[step + 2]["weights"][n][pruned[n]].abs().sum() > 0 for n in pruned)
        assert all(m is not None and not m.any() for m in by_step[step]["momentum"]), step  # momentum reset
        assert all(m.abs().sum() > 0 for m in by_step[step - 1]["momentum"])


def test_without_momentum_reset_the_momentum_carries_over():
    watch = Watch()
    _fit([Before(), watch], reset_momentum=False)
    by_step = {r["step"]: r for r in watch.steps}
    assert all(m.abs().sum() > 0 for m in by_step[16]["momentum"])


def test_resume_in_a_dense_phase_equals_an_uninterrupted_run(tmp_path):
    straight, _ = _fit([], root=tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit([ckpt, StopAfter(5)], root=tmp_path / "b")  # step 40: the third compressed phase begins at resume
    resumed, _ = _fit([], root=tmp_path / "c", ckpt_path=tmp_path / "ckpt" / "epoch=3.ckpt")  # step 32: dense
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "`sparsity` must"),
        ({"phase": 0}, "`phase`"),
        ({"start": 0.9, "end": 0.1}, "must come after"),
        ({"distribution": "random"}, "`distribution` must be one of"),
        ({"pattern": "2:4", "sparsity": 0.75}, "more than pattern 2:4 allows"),
        ({"reset_momentum": "yes"}, "`reset_momentum` must be a bool"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ACDC(**kwargs)
