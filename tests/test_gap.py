import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import ResumeProbe, StopAfter

from sparse_lightning import GaP, masks_of

NAMES = ["conv.weight", "fc1.weight", "fc2.weight"]


class DensityLog(pl.Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        masks = masks_of(pl_module)
        self.by_step[trainer.global_step - 1] = {n: masks[n].float().mean().item() for n in NAMES}


def test_each_phase_grows_one_part_and_prunes_the_previous_one():
    torch.manual_seed(0)
    log = DensityLog()
    gap = GaP(sparsity=0.8, parts=3, phase=4, log_sparsity=False)
    pl.Trainer(max_epochs=2, callbacks=[gap, log], **QUIET).fit(TinyNet("adam", lr=0.01), tiny_loader())
    target = {n: 1 - gap.prune_counts[n] / m.numel() for n, m in masks_of(gap._module).items()}
    for step, dense in [
        (0, "conv.weight"),
        (3, "conv.weight"),
        (4, "fc1.weight"),
        (8, "fc2.weight"),
        (11, "fc2.weight"),
    ]:
        for name in NAMES:
            expected = 1.0 if name == dense else target[name]
            assert log.by_step[step][name] == pytest.approx(expected), (step, name)
    for step in (12, 13, 15):
        assert log.by_step[step] == pytest.approx(target)
    masks = masks_of(gap._module)
    total = sum(m.numel() for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == round(0.8 * total)


def test_resume_in_the_middle_of_a_phase(tmp_path):
    def fit(root, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        model = TinyNet("adam", lr=0.01)
        trainer = pl.Trainer(
            max_epochs=4,
            callbacks=[GaP(sparsity=0.8, parts=3, phase=6), *callbacks],
            default_root_dir=root,
            **{**QUIET, "enable_checkpointing": True},
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(tmp_path / "b", [ckpt, StopAfter(2)])
    probe = ResumeProbe()
    resumed = fit(tmp_path / "c", [probe], ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")  # step 16, inside phase 2
    assert probe.steps == 16
    for name, mask in masks_of(straight).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": 4}, "`parts`=4 is more than the 3 selected parameters"),
        ({"parts": 3, "phase": 5}, r"3 phases of 5 steps from step 0 end at step 15, but training has only 8 steps"),
    ],
)
def test_bad_input_fails_before_training(kwargs, message):
    trainer = pl.Trainer(max_epochs=1, callbacks=[GaP(**kwargs)], **QUIET)
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyNet(), tiny_loader())
    with pytest.raises(ValueError, match="`parts` and `cycles` must be at least 1"):
        GaP(parts=0)
