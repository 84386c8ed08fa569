"""Sparsity logging: the one helper every callback uses, and the :class:`SparsityMonitor` callback.

Scalars go through ``pl_module.log`` so every Lightning logger receives them: ``sparsity/global`` (fraction of
exact zeros over the masked weights), ``sparsity/target`` (the scheduled target) and ``sparsity/<parameter name>``.
``sparsity/global`` is also shown in the progress bar. With a ``WandbLogger``, :func:`log_wandb_details` adds a
per-layer table (``sparsity/layers``) and histograms of the kept weights (``weights/<parameter name>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from sparse_lightning.core.errors import ConfigTypeError
from sparse_lightning.core.masks import MaskSet


def weight_sparsities(params: Mapping[str, Tensor], names: Iterable[str]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over all ``names`` together, and per name."""
    per_layer, zeros, total = {}, 0, 0
    with torch.no_grad():
        for name in names:
            p = params[name]
            z = int((p == 0).sum())
            per_layer[name] = z / p.numel()
            zeros, total = zeros + z, total + p.numel()
    return (zeros / total if total else 0.0), per_layer


def log_sparsity(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    names: Iterable[str],
    target: float | None,
    prog_bar: bool = True,
) -> dict[str, float]:
    """Log ``sparsity/global``, ``sparsity/target`` and ``sparsity/<name>`` through ``pl_module.log``."""
    params = dict(pl_module.named_parameters())
    global_sparsity, per_layer = weight_sparsities(params, names)
    values = {"sparsity/global": global_sparsity}
    if target is not None:
        values["sparsity/target"] = float(target)
    values.update({f"sparsity/{name}": value for name, value in per_layer.items()})
    has_logger = bool(trainer.loggers)
    for key, value in values.items():
        pl_module.log(
            key,
            value,
            on_step=True,
            on_epoch=False,
            prog_bar=prog_bar and key == "sparsity/global",
            logger=has_logger,
            batch_size=1,
        )
    return values


def should_log(trainer: pl.Trainer) -> bool:
    """Whether Lightning will send logged step values to the loggers at this batch."""
    return bool(trainer._logger_connector.should_update_logs)


@rank_zero_only
def log_wandb_details(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    names: Iterable[str],
    targets: Mapping[str, float] | None = None,
    histograms: bool = True,
) -> None:
    """With a ``WandbLogger``: a per-layer table and histograms of the kept (non-zero) weights."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    params = dict(pl_module.named_parameters())
    mask_set = MaskSet.of(pl_module)
    names = list(names)
    rows = []
    for name in names:
        p = params[name].detach()
        zeros = int((p == 0).sum())
        target = (targets or {}).get(name)
        rows.append([name, str(tuple(p.shape)), p.numel(), p.numel() - zeros, zeros / p.numel(), target])
    step = trainer.global_step
    for logger in loggers:
        logger.log_table(
            "sparsity/layers",
            columns=["parameter", "shape", "numel", "nonzero", "sparsity", "target"],
            data=rows,
            step=step,
        )
        if histograms:
            hist = {}
            for name in names:
                p = params[name].detach()
                kept = p[mask_set.mask_for(name, p)] if name in mask_set else p[p != 0]
                if kept.numel():
                    hist[f"weights/{name}"] = wandb.Histogram(kept.float().cpu().numpy())
            if hist:
                logger.experiment.log({**hist, "trainer/global_step": step})


class SparsityMonitor(pl.Callback):
    """Log the sparsity of every masked parameter of the module, whichever method masks it.

    Args:
        prog_bar: show ``sparsity/global`` in the progress bar.
        wandb_details: with a ``WandbLogger``, log the per-layer table and weight histograms at the end of every
            training epoch and of ``fit``.
        histograms: include the weight histograms in those details.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(sparsity=0.9, log_sparsity=False), SparsityMonitor()])
    """

    def __init__(self, prog_bar: bool = True, wandb_details: bool = True, histograms: bool = True) -> None:
        for name, value in (("prog_bar", prog_bar), ("wandb_details", wandb_details), ("histograms", histograms)):
            if not isinstance(value, bool):
                raise ConfigTypeError(f"`{name}` must be a bool, got {value!r}.")
        self.prog_bar = prog_bar
        self.wandb_details = wandb_details
        self.histograms = histograms

    @staticmethod
    def _target(trainer: pl.Trainer) -> float | None:
        from sparse_lightning.callbacks.base import SparsityCallback

        weighted, total = 0.0, 0
        for cb in trainer.callbacks:
            if isinstance(cb, SparsityCallback) and cb.current_target is not None:
                n = cb.num_selected
                weighted, total = weighted + cb.current_target * n, total + n
        return weighted / total if total else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        names = MaskSet.of(pl_module).names()
        if names and should_log(trainer):
            log_sparsity(trainer, pl_module, names, self._target(trainer), prog_bar=self.prog_bar)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = MaskSet.of(pl_module).names()
        if names and self.wandb_details:
            log_wandb_details(trainer, pl_module, names, histograms=self.histograms)
