"""Sparsity logging: the one writer for a module's masks, and the :class:`SparsityMonitor` callback.

However many methods mask one module, one callback writes its sparsity: a :class:`SparsityMonitor` if the trainer
has one, otherwise the first mask-producing callback with ``log_sparsity=True`` (:func:`sparsity_writer`). Scalars
go through ``pl_module.log`` so every Lightning logger receives them:

- ``sparsity/global``: fraction of exact zeros over every masked parameter of the module (also in the progress bar);
- ``sparsity/target``: the methods' current targets, weighted by the number of values each selects;
- ``sparsity/<parameter name>``: fraction of exact zeros of each masked parameter.

With a ``WandbLogger``, :func:`log_wandb_details` adds a per-layer table (``sparsity/layers``, with each layer's
target: the fraction its mask removes) and histograms of the kept weights (``weights/<parameter name>``), after
every change of the masks and at the end of ``fit``.
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


def _methods(trainer: pl.Trainer) -> list:
    from sparse_lightning.callbacks.base import SparsityCallback

    return [cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback)]


def sparsity_writer(trainer: pl.Trainer) -> pl.Callback | None:
    """The one callback that logs the module's sparsity (see the module docstring)."""
    for cb in trainer.callbacks:
        if isinstance(cb, SparsityMonitor):
            return cb
    return next((cb for cb in _methods(trainer) if cb.log_sparsity), None)


def combined_target(trainer: pl.Trainer) -> float | None:
    """The methods' current targets weighted by how many values each selects (``None`` if none has a target)."""
    weighted, total = 0.0, 0
    for cb in _methods(trainer):
        if cb.current_target is not None:
            n = cb.num_selected
            weighted, total = weighted + cb.current_target * n, total + n
    return weighted / total if total else None


def sparsity_values(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """``sparsity/global``, ``sparsity/target`` and ``sparsity/<name>`` over every mask of ``pl_module``."""
    names = MaskSet.of(pl_module).names()
    if not names:
        return {}
    global_sparsity, per_layer = weight_sparsities(dict(pl_module.named_parameters()), names)
    values = {"sparsity/global": global_sparsity}
    target = combined_target(trainer)
    if target is not None:
        values["sparsity/target"] = float(target)
    values.update({f"sparsity/{name}": value for name, value in per_layer.items()})
    return values


def log_sparsity(
    trainer: pl.Trainer, pl_module: pl.LightningModule, values: Mapping[str, float], prog_bar: bool = True
) -> None:
    """Log ``values`` through ``pl_module.log`` (``sparsity/global`` in the progress bar)."""
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


def should_log(trainer: pl.Trainer) -> bool:
    """Whether Lightning will send logged step values to the loggers at this batch."""
    return bool(trainer._logger_connector.should_update_logs)


@rank_zero_only
def log_wandb_details(trainer: pl.Trainer, pl_module: pl.LightningModule, histograms: bool = True) -> None:
    """With a ``WandbLogger``: a per-layer table of every masked parameter and histograms of the kept weights."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    mask_set = MaskSet.of(pl_module)
    if not loggers or not len(mask_set):
        return
    import wandb

    params = dict(pl_module.named_parameters())
    targets: dict[str, float] = {}
    for cb in _methods(trainer):
        targets.update(cb.layer_targets())
    rows = []
    for name in mask_set.names():
        p = params[name].detach()
        zeros = int((p == 0).sum())
        rows.append([name, str(tuple(p.shape)), p.numel(), p.numel() - zeros, zeros / p.numel(), targets.get(name)])
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
            for name in mask_set.names():
                p = params[name].detach()
                kept = p[mask_set.mask_for(name, p)]
                if kept.numel():
                    hist[f"weights/{name}"] = wandb.Histogram(kept.float().cpu().numpy())
            if hist:
                logger.experiment.log({**hist, "trainer/global_step": step})


class SparsityWriter:
    """What the writing callback does after each batch.

    The values are computed at the first step, when Lightning logs (``log_every_n_steps``) and after every mask
    change; the first step and mask changes reach the loggers even between logging steps, and
    ``sparsity/global`` is in the progress bar from the first step on (the last computed value in between).
    W&B details are logged after every mask change.
    """

    def __init__(self) -> None:
        self._logged_version = 0
        self._values: dict[str, float] | None = None

    def write_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prog_bar: bool = True,
        histograms: bool = True,
        details: bool = True,
    ) -> None:
        version = MaskSet.of(pl_module).version
        changed, first, regular = version != self._logged_version, self._values is None, should_log(trainer)
        if regular or changed or first:
            self._values = sparsity_values(trainer, pl_module)
            log_sparsity(trainer, pl_module, self._values, prog_bar)
            if (changed or first) and not regular and self._values and trainer.loggers:
                trainer._logger_connector.log_metrics(self._values)
        elif prog_bar and self._values and trainer.progress_bar_callback is not None:
            log_sparsity(trainer, pl_module, {"sparsity/global": self._values["sparsity/global"]}, prog_bar)
        if changed:
            self._logged_version = version
            if details:
                log_wandb_details(trainer, pl_module, histograms)

    def write_details(self, trainer: pl.Trainer, pl_module: pl.LightningModule, histograms: bool = True) -> None:
        self._logged_version = MaskSet.of(pl_module).version
        log_wandb_details(trainer, pl_module, histograms)


class SparsityMonitor(pl.Callback):
    """Log the sparsity of every masked parameter of the module, whichever methods mask it.

    With a monitor in the trainer, it is the one writer (the methods' own ``log_sparsity`` is then unused).

    Args:
        prog_bar: show ``sparsity/global`` in the progress bar.
        wandb_details: with a ``WandbLogger``, log the per-layer table and weight histograms after each change of
            the masks, at the end of every training epoch and of ``fit``.
        histograms: include the weight histograms in those details.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(sparsity=0.9), SparsityMonitor(prog_bar=False)])
    """

    def __init__(self, prog_bar: bool = True, wandb_details: bool = True, histograms: bool = True) -> None:
        for name, value in (("prog_bar", prog_bar), ("wandb_details", wandb_details), ("histograms", histograms)):
            if not isinstance(value, bool):
                raise ConfigTypeError(f"`{name}` must be a bool, got {value!r}.")
        self.prog_bar = prog_bar
        self.wandb_details = wandb_details
        self.histograms = histograms
        self._writer = SparsityWriter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._writer.write_step(trainer, pl_module, self.prog_bar, self.histograms, self.wandb_details)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.wandb_details:
            self._writer.write_details(trainer, pl_module, self.histograms)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.wandb_details:
            self._writer.write_details(trainer, pl_module, self.histograms)
