"""Run by tests/test_ddp.py as ``python tests/ddp_train.py OUT_DIR``: Lightning's ``ddp`` on 2 CPU processes.

Each rank records a fingerprint of its masks after every mask update and writes its final masks and weights to
``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyNet, flop_seconds, tiny_loader  # noqa: E402

from sparse_lightning import (  # noqa: E402
    ACDC,
    SET,
    ChannelPruning,
    ControlledSparsity,
    EarlyCroP,
    GaP,
    GradualMagnitudePruning,
    MFACPreconditioner,
    MFACPruning,
    RigL,
    SoftMaskChannelPruning,
    SpectralHessianRegularization,
    masks_of,
)
from sparse_lightning.core.masks import MaskSet  # noqa: E402
from sparse_lightning.structure import latency  # noqa: E402


class Record(pl.Callback):
    def __init__(self) -> None:
        self.history: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        fingerprints = MaskSet.of(pl_module).fingerprints()
        self.history.append((trainer.global_step, torch.stack(list(fingerprints.values()))))


class DivergentMasks(GradualMagnitudePruning):
    """Rank 1 keeps one more weight of fc1 than rank 0 at every update: a divergence the ranks must report."""

    def compute_masks(self, step, params):
        masks = super().compute_masks(step, params)
        if self._module.trainer.global_rank == 1:
            masks["fc1.weight"].view(-1)[0] = True
        return masks


class DivergentWeights(MFACPruning):
    """Rank 1's OBS update moves one kept weight of fc2 a little: same masks, different weights."""

    def compute_masks(self, step, params):
        masks = super().compute_masks(step, params)
        if self._module.trainer.global_rank == 1:
            with torch.no_grad():
                params["fc2.weight"].view(-1)[masks["fc2.weight"].view(-1).nonzero()[0]] += 1e-3
        return masks


def rank_seconds(call, device, repeats) -> float:
    """A timer that disagrees between ranks: only rank 0's table may be used."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return flop_seconds(call, device, repeats, scale=1e-9 * (1 + rank)) + rank * 1e-5


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = TinyNet("adam", lr=0.01)
    variant = sys.argv[2] if len(sys.argv) > 2 else "global"
    if variant == "gap":
        pruning = GaP(sparsity=0.9, parts=3, phase=5)
    elif variant in ("rigl", "set"):
        method = RigL if variant == "rigl" else SET
        pruning = method(sparsity=0.9, end=20, every=3, drop_noise=1e-5)
    elif variant == "diverge_masks":
        pruning = DivergentMasks(sparsity=0.9, start=1, end=10, every=3)
    elif variant == "diverge_weights":
        pruning = DivergentWeights(sparsity=0.9, start=1, end=10, every=3, num_grads=4, block_size=64)
    elif variant == "channels":
        model.example_input_array = torch.zeros(2, 16)
        pruning = ChannelPruning(sparsity=0.5, criterion="taylor", start=1, end=10, every=3)
    elif variant == "smcp":
        model.example_input_array = torch.zeros(2, 16)
        pruning = SoftMaskChannelPruning(sparsity=0.5, importance="taylor_fo", round_to=1, start=1, end=20, every=3)
    elif variant == "smcp_latency":
        os.environ["SPARSE_LIGHTNING_CACHE"] = str(out / "cache")
        latency._seconds = rank_seconds
        model.example_input_array = torch.zeros(2, 16)
        pruning = SoftMaskChannelPruning(
            sparsity=0.5, cost="latency", importance="taylor_fo", round_to=1, start=1, end=20, every=3
        )
    elif variant in ("earlycrop", "earlycrop_s"):
        model.example_input_array = torch.zeros(2, 16)
        structured = variant == "earlycrop_s"
        pruning = EarlyCroP(sparsity=0.5 if structured else 0.9, structured=structured, batches=2, prune_at="2ep")
    elif variant == "spectral":
        pruning = GradualMagnitudePruning(sparsity=0.9, start=1, end=10, every=3)
        extra_spectral = SpectralHessianRegularization(strength=0.05, bound=0.0, every=2)
    elif variant == "acdc":
        pruning = ACDC(sparsity=0.9, start=2, end=18, phase=4)
    elif variant == "spectral_neurons":
        model.example_input_array = torch.zeros(2, 16)
        pruning = SpectralHessianRegularization(
            strength=0.05, bound=0.0, every=2, method="kfac", sparsity=0.5, start=1, end=10, prune_every=3
        )
    elif variant in ("l0", "l0_structured"):
        model.example_input_array = torch.zeros(2, 16)
        structured = variant == "l0_structured"
        pruning = ControlledSparsity(
            sparsity=0.7, structured=structured, constraint="model", gate_lr=0.05, dual_lr=0.05
        )
    elif variant == "mfac_pruning":
        pruning = MFACPruning(sparsity=0.9, start=1, end=10, every=3, num_grads=4, block_size=64, recomputations=2)
    else:
        distribution = "global" if variant == "mfac_preconditioner" else variant
        pruning = GradualMagnitudePruning(sparsity=0.9, start=1, end=10, every=3, distribution=distribution)
    extra = [MFACPreconditioner(num_grads=8)] if variant == "mfac_preconditioner" else []
    if variant == "spectral":
        extra = [extra_spectral]
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=[pruning, *extra, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, tiny_loader(n=64, batch_size=4))
    torch.save(
        {
            "masks": {n: m.clone() for n, m in masks_of(model).items()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "history": record.history,
            "steps": trainer.global_step,
            "callback_state": extra[0].state_dict() if extra else pruning.state_dict(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
