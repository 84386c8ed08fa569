import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader

from sparse_lightning import SNIP, masks_of


def expected_snip_masks(model, batches, sparsity):
    model = copy.deepcopy(model)
    names = ["conv.weight", "fc1.weight", "fc2.weight"]
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for i, (x, y) in enumerate(tiny_loader()):
        if i == batches:
            break
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n in names:
            sums[n] += params[n].grad
    scores = torch.cat([(sums[n] * params[n].detach()).abs().flatten() for n in names])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.argsort(descending=True)[: scores.numel() - round(sparsity * scores.numel())]] = True
    out, offset = {}, 0
    for n in names:
        out[n] = keep[offset : offset + params[n].numel()].view_as(params[n])
        offset += params[n].numel()
    return out


class MaskHistory(pl.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append({n: m.clone() for n, m in masks_of(pl_module).items()})


@pytest.mark.parametrize("batches", [1, 3])
def test_snip_scores_g_times_w_at_init_and_keeps_the_mask(batches):
    torch.manual_seed(0)
    model = TinyNet("sgd", lr=0.05)
    model.train()
    initial = copy.deepcopy(model)
    expected = expected_snip_masks(initial, batches, 0.7)
    history = MaskHistory()
    trainer = pl.Trainer(max_epochs=2, callbacks=[SNIP(sparsity=0.7, batches=batches), history], **QUIET)
    trainer.fit(model, tiny_loader())
    first = history.history[batches - 1]
    for name, mask in expected.items():
        assert torch.equal(first[name], mask), name
    for later in history.history[batches:]:
        assert all(torch.equal(later[n], first[n]) for n in first), "SNIP masks changed after the first step"
    masks = masks_of(model)
    total = sum(m.numel() for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == round(0.7 * total)


def test_more_batches_than_the_loader_fails_before_training():
    trainer = pl.Trainer(max_epochs=1, callbacks=[SNIP(batches=50)], **QUIET)
    with pytest.raises(ValueError, match="`batches`=50 is more than the 8 optimizer steps"):
        trainer.fit(TinyNet(), tiny_loader())
    with pytest.raises(ValueError, match="`batches` must be an int >= 1"):
        SNIP(batches=0)
