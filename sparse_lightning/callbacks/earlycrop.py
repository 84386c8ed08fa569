"""EarlyCroP: prune once, early, by gradient-flow preservation (Rachwan et al., ICML 2022)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor, nn

from sparse_lightning.callbacks.base import SparsityCallback, check_fraction, check_strategy, training_loss
from sparse_lightning.callbacks.channels import ChannelMethod
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.crop import crop_scores, hessian_gradient_product, iterative_targets, settled
from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_int
from sparse_lightning.core.masks import is_distributed
from sparse_lightning.core.plan import Event, MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeValue, parse_time
from sparse_lightning.core.targets import select_parameters
from sparse_lightning.structure.groups import channel_masks
from sparse_lightning.structure.selection import select_channels
from sparse_lightning.structure.tracer import evaluating


@register("early_crop")
class EarlyCroP(ChannelMethod):
    """EarlyCroP: Rachwan, Zügner, Charpentier, Geisler, Ayle & Günnemann, "Winning the Lottery Ahead of Time:
    Efficient Early Network Pruning" (ICML 2022).

    **When.** theta_ref is every parameter at the end of the first epoch; at each later epoch end
    d_t = |theta_t - theta_ref| / |theta_ref| is logged (``earlycrop/distance``), and the network is pruned at the
    first epoch end with |d_t - d_{t-1}| < tau, tau = d_first x (1 - ``sparsity``) (structured: x min(1 - ``sparsity``
    - 0.1, 0.99)), d_first the first distance and d_0 = 0 (as the reference, whose trigger can therefore not fire at
    the first distance). It prunes at the first epoch end at or after ``prune_at`` if the trigger has not fired,
    and at the last epoch end of training if neither happened, so a run always ends at its target. Deliberate
    difference: ``prune_at`` defaults to half of training. The reference waits up to epoch 100 and then trains its
    80 epochs after the prune (its fallback comes after at most 100 of 180 epochs); here the trainer fixes the run's
    length, and epoch 100 would be the end of a 100-epoch run. The reference's structured tau is not positive for
    ``sparsity`` >= 0.9, so that trigger never fires; the same holds here (the prune then comes at ``prune_at``),
    and the plan says so. Until the prune the callback holds theta_ref, a copy of every parameter, in memory and in
    checkpoints.

    **Score (CroP).** On ``batches`` batches of the *training* data (the reference scores on its test loader), in
    eval mode like the reference: g_bar = sum_b grad L_b, then H g_bar accumulated by one double backward per batch,
    and the saliency |theta * H g_bar| (:mod:`sparse_lightning.core.crop`). The loss is the module's
    ``training_step`` on each batch (its logging silenced). Under DDP g_bar and H g_bar are summed over ranks, so
    every rank scores all ranks' batches and computes the same masks.

    **Unstructured** (``structured=False``): the global top-k of the selected weights (default: every Linear/Conv
    weight), pruned along :func:`~sparse_lightning.core.crop.iterative_targets` (``steps`` re-scorings, reference
    100), each step re-scoring the network pruned so far; a step that would prune no more weights than the last is
    skipped (its score and choice would repeat exactly). ``sparsity`` is the fraction of zeros over the selected
    weights.

    **Structured** (``structured=True``, EarlyCroP-S): gates fixed at 1 multiply each Conv/Linear producer's output
    channels; a channel's score is |dz/dgate| summed over its group's producers; channels leave by raw global rank
    (no per-group normalization, as the paper) until ``sparsity`` of ``cost`` is removed, in the reference's four
    steps L/4, L/2, 3L/4, L. The model is then compacted during ``fit`` on a single device, so the rest of training
    runs on the smaller network (``compact_during_fit``, default: on a single device); under DDP the channel masks
    stay and ``compact`` removes the channels after training.

    After the prune the masks never change. ``restart_lr=True`` replaces each optimizer's learning-rate schedule by a
    fresh one-cycle schedule (``OneCycleLR``, peak at the optimizer's initial learning rate) over the remaining
    steps, as the reference restarts its one-cycle schedule (over the run's full length there); off by default,
    since the learning rate belongs to the user's module.

    Args:
        sparsity: unstructured: fraction of zeros over the selected weights; structured: fraction of ``cost``
            removed. In [0, 1).
        structured: prune channels (EarlyCroP-S) instead of weights.
        cost: structured only: ``flops`` (default), ``params`` or ``channels``.
        batches: training batches per score (reference: 5).
        steps: unstructured re-scorings within the event (reference: 100).
        prune_at: prune at the first epoch end at or after this time if the trigger has not fired (default half of
            training; the reference: epoch 100); a time argument as everywhere in the plugin.
        restart_lr: restart a one-cycle learning rate after the prune.
        round_to: structured only: kept channel counts are multiples of this.
        compact_during_fit: structured only: remove the channels from the training module at the prune (default:
            on a single device).
        include, exclude, log_sparsity: as every method.
    """

    scores_gradients = False
    updates_in_steps = False

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        structured: bool = False,
        cost: str | None = None,
        batches: int = 5,
        steps: int = 100,
        prune_at: TimeValue = 0.5,
        restart_lr: bool = False,
        round_to: int = 1,
        compact_during_fit: bool | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        for name, flag in (("structured", structured), ("restart_lr", restart_lr)):
            if not isinstance(flag, bool):
                raise ConfigTypeError(f"`{name}` must be a bool, got {flag!r}.")
        if not structured:
            for name, value, default in (
                ("cost", cost, None),
                ("round_to", round_to, 1),
                ("compact_during_fit", compact_during_fit, None),
            ):
                if value != default:
                    raise ConfigError(f"`{name}` is for `structured=True`; unstructured EarlyCroP prunes weights.")
        if compact_during_fit is not None and not isinstance(compact_during_fit, bool):
            raise ConfigTypeError(f"`compact_during_fit` must be a bool or None, got {compact_during_fit!r}.")
        super().__init__(
            cost=cost or "flops", round_to=round_to, include=include, exclude=exclude, log_sparsity=log_sparsity
        )
        self.sparsity = check_fraction("sparsity", sparsity)
        self.structured, self.restart_lr = structured, restart_lr
        self.compact_choice = compact_during_fit
        self.batches = check_int("batches", batches, minimum=1)
        self.steps = check_int("steps", steps, minimum=0)
        self.prune_at_spec = parse_time(prune_at, "prune_at", allow_zero=False)
        self.prune_at_step: int | None = None
        self._last_step: int | None = None
        self.factor = min(1 - self.sparsity - 0.1, 0.99) if structured else 1 - self.sparsity
        self.add_state("reference", {})
        self.add_state("distances", [])
        self.add_state("pruned_epoch", -1)
        self.add_state("trigger", None)
        self.add_state("restarted", {})
        self._trainer: pl.Trainer | None = None
        self._schedules: list[torch.optim.lr_scheduler.OneCycleLR] = []
        self.prune_seconds = 0.0
        """Wall-clock seconds of the prune (every scoring, the masks and any compaction)."""
        self.rescorings = 0
        """Scorings the last prune ran (each one the ``batches`` forward/backward passes and double backwards)."""

    def describe(self) -> str:
        return "CroP score |dz/dgate|, raw global ranking, pruned once (EarlyCroP-S)"

    @property
    def current_target(self) -> float | None:
        return self.sparsity if self.pruned_epoch >= 0 else 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, structured=self.structured)

    # --- selection and schedule --------------------------------------------------------------------------------

    def select(self, module: nn.Module) -> dict[str, Tensor]:
        return super().select(module) if self.structured else SparsityCallback.select(self, module)

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        return super().plan(module, timeline) if self.structured else SparsityCallback.plan(self, module, timeline)

    def resolve_schedule(self, timeline: Timeline) -> None:
        self.prune_at_step = timeline.step(self.prune_at_spec, "prune_at")
        self._last_step = int(timeline.total_steps) - 1 if timeline.finite else None

    def events(self) -> list[Event]:
        assert self.prune_at_step is not None
        step, when = self.prune_at_step, "at `prune_at`"
        if self._last_step is not None and step > self._last_step:
            step, when = self._last_step, "at the last epoch (`prune_at` lies beyond training)"
        note = f"prune when d_t settles, {when} at the latest"
        if self.factor <= 0:
            note = f"prune {when}: the structured trigger can not fire at sparsity {self.sparsity}"
        return [Event(step, note, self.sparsity)]

    # --- hooks -------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)
            if not pl_module.automatic_optimization:
                raise ConfigError(
                    "EarlyCroP scores with the module's `training_step`, which under manual optimization "
                    "(`automatic_optimization = False`) would step the optimizers itself; use automatic optimization."
                )
            single = trainer.world_size == 1 and not is_distributed()
            self.compact_during_fit = self.structured and (
                single if self.compact_choice is None else self.compact_choice
            )
        if self.structured:
            super().setup(trainer, pl_module, stage)
        else:
            SparsityCallback.setup(self, trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        available = trainer.num_training_batches
        if self.pruned_epoch < 0 and math.isfinite(available) and available < self.batches:
            raise ConfigError(
                f"EarlyCroP scores on `batches`={self.batches} training batches, but an epoch has only "
                f"{int(available)}: lower `batches`."
            )
        if self.restarted:
            self._restart_lr(trainer, self.restarted)

    def state_dict(self) -> dict[str, Any]:
        if self._schedules:
            self.restarted = {**self.restarted, "states": [s.state_dict() for s in self._schedules]}
        return super().state_dict()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned_epoch >= 0:
            return
        reason = self._trigger(pl_module)
        assert self.prune_at_step is not None
        if reason is None and trainer.global_step >= self.prune_at_step:
            reason = "prune_at"
        if reason is None and self._last_epoch(trainer):
            reason = "end of training"
        if reason is not None:
            self._prune(trainer, pl_module, reason)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned_epoch < 0:  # stopped mid-epoch (max_steps): still end at the target (nothing may log here)
            log, self.log_sparsity = self.log_sparsity, False
            try:
                self._prune(trainer, pl_module, "end of training")
            finally:
                self.log_sparsity = log

    def _last_epoch(self, trainer: pl.Trainer) -> bool:
        if trainer.should_stop:
            return True
        if (
            trainer.max_epochs is not None
            and trainer.max_epochs >= 0
            and trainer.current_epoch + 1 >= trainer.max_epochs
        ):
            return True
        return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps

    def _trigger(self, pl_module: pl.LightningModule) -> str | None:
        """Record d_t; ``"trigger"`` when |d_t - d_{t-1}| < tau."""
        params = {n: p.detach() for n, p in pl_module.named_parameters()}
        if not self.reference:
            self.reference = {n: p.clone() for n, p in params.items()}
            return None
        reference_norm = torch.sqrt(sum(r.double().square().sum() for r in self.reference.values()))
        moved = torch.sqrt(sum((params[n].double() - r.double()).square().sum() for n, r in self.reference.items()))
        distance = float(moved / reference_norm) if float(reference_norm) > 0 else 0.0
        self.distances.append(distance)
        if self.log_sparsity:
            pl_module.log("earlycrop/distance", distance, on_step=False, on_epoch=True)
        return "trigger" if settled(self.distances, self.factor) else None

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        self._trainer = trainer
        began = time.perf_counter()
        self.update_masks(trainer, pl_module, trainer.global_step)
        self.prune_seconds = time.perf_counter() - began
        self.pruned_epoch, self.trigger, self.reference = trainer.current_epoch, reason, {}
        rank_zero_info(
            f"EarlyCroP: pruned to {self.sparsity} at epoch {trainer.current_epoch} ({reason}; "
            f"{self.rescorings} scorings, {self.prune_seconds:.1f} s)."
        )
        if self.log_sparsity:
            pl_module.log("earlycrop/pruned_epoch", float(trainer.current_epoch), on_step=False, on_epoch=True)
        if self.restart_lr:
            peaks = [[g.get("initial_lr", g["lr"]) for g in o.param_groups] for o in trainer.optimizers]
            self.restarted = {
                "peaks": peaks,
                "total_steps": max(int(trainer.estimated_stepping_batches) - trainer.global_step, 1),
            }
            self._restart_lr(trainer, self.restarted)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.structured:
            super().update_masks(trainer, pl_module, step)
        else:
            SparsityCallback.update_masks(self, trainer, pl_module, step)

    # --- the score ---------------------------------------------------------------------------------------------

    def _batches(self, trainer: pl.Trainer) -> list[Any]:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            raise ConfigError(f"EarlyCroP scores on one training DataLoader; this run has {type(loader).__name__}.")
        batches = []
        for i, batch in enumerate(loader):
            if i == self.batches:
                break
            batches.append(trainer.strategy.batch_to_device(batch))
        if len(batches) < self.batches:
            raise ConfigError(
                f"EarlyCroP scores on `batches`={self.batches} training batches, but the training loader gave only "
                f"{len(batches)}: lower `batches`."
            )
        return batches

    def _product(
        self, pl_module: pl.LightningModule, weights: Mapping[str, Tensor], gates: Sequence[Tensor] = ()
    ) -> list[Tensor]:
        """H g_bar for ``weights`` (with their current masks), then dz/dgate for ``gates``."""
        trainer = self._trainer
        assert trainer is not None
        batches = self._batches(trainer)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if is_distributed() else None
        masks = [self.mask_set.mask_for(n, p) if n in self.mask_set else None for n, p in weights.items()]

        def loss(b: int) -> Tensor:
            return training_loss(pl_module, batches[b], b, "EarlyCroP")

        with evaluating(pl_module), torch.enable_grad():
            _, product = hessian_gradient_product(loss, self.batches, list(weights.values()), masks, reduce, gates)
        self.rescorings += 1
        return product

    def _weights(self) -> dict[str, Tensor]:
        """The weights in z: every Linear/Conv weight of the module (the reference's), selected or not."""
        assert self._module is not None
        params = self.params()
        return {n: params[n] for n in select_parameters(self._module)}

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.rescorings = 0
        return self._channel_masks(params) if self.structured else self._weight_masks(params)

    def _weight_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        masks = {n: self.mask_set.mask_for(n, params[n]).clone() for n in self.names}
        total = sum(m.numel() for m in masks.values())
        for target in iterative_targets(self.sparsity, self.steps):
            prune = round(target * total)
            if prune <= sum(int((~m).sum()) for m in masks.values()):
                continue
            weights = self._weights()
            hg = dict(zip(weights, self._product(self._module, weights), strict=True))  # type: ignore[arg-type]
            scores = crop_scores(params, {n: hg[n] for n in self.names})
            flat = torch.cat([scores[n].masked_fill(~masks[n], -math.inf).flatten().double() for n in self.names])
            keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
            keep[torch.argsort(flat, descending=True, stable=True)[: total - prune]] = True
            offset = 0
            with torch.no_grad():
                for n in self.names:
                    masks[n] = keep[offset : offset + masks[n].numel()].view_as(masks[n]).to(masks[n].device)
                    offset += masks[n].numel()
                    params[n].mul_(masks[n])  # the next scoring sees the pruned network
        return masks

    def _channel_masks(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self._cost is not None and self._module is not None
        shapes = {n: params[n].shape for n in self.names}
        keeps = {n: k.clone() for n, k in self.keeps.items()}
        for target in (self.sparsity * k / 4 for k in (1, 2, 3, 4)):
            scores = self._gate_scores()
            keeps = select_channels(self.groups, scores, keeps, self._cost, target, self.round_to, normalize=False)
            with torch.no_grad():
                for n, mask in channel_masks(self.groups, keeps, shapes).items():
                    params[n].mul_(mask.to(params[n].device))
        self.keeps = keeps
        return channel_masks(self.groups, keeps, shapes)

    def _gate_scores(self) -> dict[str, Tensor]:
        """|dz/dgate| per channel, summed over the group's producer layers."""
        assert self._module is not None
        modules = dict(self._module.named_modules())
        producers = {m.param.rsplit(".", 1)[0] for g in self.groups for m in g.role("producer") if m.dim == 0}
        gates = {}
        handles = []
        for name in sorted(producers):
            layer = modules[name]
            if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            gate = torch.ones(width, device=layer.weight.device, dtype=layer.weight.dtype, requires_grad=True)
            gates[name] = gate
            handles.append(layer.register_forward_hook(_gate_hook(gate, isinstance(layer, nn.Linear))))
        try:
            weights = self._weights()
            product = self._product(self._module, weights, list(gates.values()))  # type: ignore[arg-type]
        finally:
            for handle in handles:
                handle.remove()
        gate_grads = dict(zip(gates, product[len(weights) :], strict=True))
        scores = {}
        for g in self.groups:
            total = torch.zeros(g.channels, dtype=torch.float64)
            for m in g.role("producer"):
                layer = m.param.rsplit(".", 1)[0]
                if m.dim == 0 and layer in gate_grads:
                    total.index_add_(0, m.channel, gate_grads[layer].detach().abs().double().cpu()[m.index])
            scores[g.name] = total
        return scores

    # --- learning rate -----------------------------------------------------------------------------------------

    def _restart_lr(self, trainer: pl.Trainer, restart: Mapping[str, Any]) -> None:
        """Install a one-cycle schedule per optimizer (``restart``: its peaks and length, and on resume its saved
        states), replacing the optimizer's schedule in Lightning's scheduler configs."""
        configs = {id(c.scheduler.optimizer): c for c in trainer.lr_scheduler_configs}  # type: ignore[union-attr]
        self._schedules = []
        for i, optimizer in enumerate(trainer.optimizers):
            restored = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=restart["peaks"][i], total_steps=restart["total_steps"]
            )
            if "states" in restart:  # resumed: the checkpoint's schedule, and the optimizer as it was restored
                schedule.load_state_dict(restart["states"][i])
                for group, values in zip(optimizer.param_groups, restored, strict=True):
                    group.update(values)
            config = configs.get(id(optimizer))
            if config is None:
                trainer.lr_scheduler_configs.append(LRSchedulerConfig(schedule, interval="step"))
            else:
                config.scheduler, config.interval, config.frequency = schedule, "step", 1
            self._schedules.append(schedule)


def _gate_hook(gate: Tensor, linear: bool) -> Any:
    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output * (gate if linear else gate.view(1, -1, *[1] * (output.dim() - 2)))

    return hook
