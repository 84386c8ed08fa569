"""Controlled sparsity: hard-concrete L0 gates under a density constraint (Gallego-Posada et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lightning.callbacks.base import (
    SparsityCallback,
    Variants,
    check_fraction,
    check_strategy,
    mean_over_ranks,
)
from sparse_lightning.callbacks.channels import ChannelMethod
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_choice, check_int
from sparse_lightning.core.l0 import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    dual_step,
    eval_gates,
    gate_noise,
    gate_probability,
    hard_concrete,
    init_log_alpha,
    sample_gates,
)
from sparse_lightning.structure.groups import ChannelGroup, Member, channel_masks

CONSTRAINTS = ("layer", "model")


@register("controlled_sparsity")
class ControlledSparsity(Variants, SparsityCallback):
    """Sparsity as a constraint: Gallego-Posada, Ramirez, Erraqabi, Bengio & Lacoste-Julien, "Controlled Sparsity
    via Constrained Optimization or: How I Learned to Stop Tuning Penalties and Love Constraints" (NeurIPS 2022).

    Every selected weight w gets a hard-concrete gate z (:mod:`sparse_lightning.core.l0`, Louizos et al. 2018; one
    ``log_alpha`` per weight, initialized from ``droprate_init``): during ``fit`` each selected Linear/Conv layer
    computes with w * z, z sampled at every training forward and deterministic in eval mode. The constraint is
    expected density <= 1 - ``sparsity``, per layer (``constraint="layer"``) or over the model (``"model"``); the
    callback solves the Lagrangian E[L] + sum_l lambda_l (density_l - target) by simultaneous gradient descent on the
    weights (the user's optimizer, unchanged) and on the gates (their own Adam, ``gate_lr``), and projected gradient
    ascent on lambda >= 0 (``dual_lr``, plain SGD as the reference) with dual restarts (lambda reset to 0 while its
    constraint holds; ``dual_restarts=False`` turns them off). Deliberate difference: the reference's learning rates
    (gates 7e-4 with the weights' Adam, multipliers 1e-4) were made for 200 epochs of MNIST (about 94k steps); in
    runs of a few thousand steps the gates barely move (expected density 0.77 against a target of 0.3 after 4000
    steps on the MNIST-1D CNN), so the defaults are 1e-2 and 0.1, which meet a 0.3 or 0.1 density within 0.01 in
    4000 steps there; the benchmark shows both. The gates'
    gradients are averaged over DDP ranks and, under AMP, unscaled (a step with non-finite gradients leaves the gates
    and multipliers alone).

    The model stays the user's: the gating replaces the layers' ``forward`` on the instance during ``fit`` only, so
    the ``state_dict`` holds the user's keys with the plain weights; the gates, their optimizer and the multipliers
    are this callback's checkpoint state. At the end of ``fit`` the weights are purged: w <- w * (evaluation gate),
    whose exact zeros become the masks of the engine (``masks_of``); the layers get their own ``forward`` back.
    Logged: ``l0/expected_density`` and ``l0/multiplier`` (per layer with a ``/<parameter>`` suffix for
    ``constraint="layer"``) every step, and after purging ``l0/purged_density``, the fraction of weights left
    non-zero (it differs from the expected density, as the paper reports).

    Memory: the gates and their Adam moments are three float32 tensors the size of the selected weights.

    ``structured=True`` gates channels instead (one gate per channel of each channel group), and returns a
    :class:`StructuredControlledSparsity`.

    Args:
        sparsity: 1 - the target expected density, in [0, 1).
        structured: one gate per channel (:class:`StructuredControlledSparsity`) instead of one per weight.
        constraint: ``layer`` (one constraint and multiplier per selected weight) or ``model`` (one over all).
        droprate_init: initial drop probability of every gate (reference: 0.5).
        gate_lr: learning rate of the gates' Adam (default 1e-2; the reference's primal Adam: 7e-4).
        dual_lr: learning rate of the multipliers' ascent (default 0.1; the reference: 1e-4).
        dual_restarts: reset a multiplier to 0 while its constraint is satisfied (reference: on).
        seed: seeds the gates' initialization and sampling (saved in checkpoints, so a resumed run samples on).
        include, exclude, log_sparsity: as every method (only Linear and Conv weights can be gated).
    """

    @classmethod
    def variant(cls, kwargs: Mapping[str, Any]) -> type:
        structured = cls is ControlledSparsity and kwargs.get("structured", False) is True
        return StructuredControlledSparsity if structured else cls

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        structured: bool = False,
        constraint: str = "layer",
        droprate_init: float = 0.5,
        gate_lr: float = 1e-2,
        dual_lr: float = 0.1,
        dual_restarts: bool = True,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        if structured is not False:
            raise ConfigTypeError(f"`structured` must be a bool, got {structured!r}.")
        SparsityCallback.__init__(self, include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.sparsity = check_fraction("sparsity", sparsity)
        self.init_gates(constraint, droprate_init, gate_lr, dual_lr, dual_restarts, seed)

    def init_gates(
        self, constraint: str, droprate_init: float, gate_lr: float, dual_lr: float, dual_restarts: bool, seed: int
    ) -> None:
        """Check and store the gates' and the multipliers' arguments and declare their state."""
        self.constraint = check_choice("constraint", constraint, CONSTRAINTS)
        droprate = check_fraction("droprate_init", droprate_init)
        if droprate == 0:
            raise ConfigError("`droprate_init` must lie in (0, 1), got 0.")
        self.droprate_init = droprate
        for name, value in (("gate_lr", gate_lr), ("dual_lr", dual_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"`{name}` must be a positive number, got {value!r}.")
        if not isinstance(dual_restarts, bool):
            raise ConfigTypeError(f"`dual_restarts` must be a bool, got {dual_restarts!r}.")
        self.gate_lr, self.dual_lr, self.dual_restarts = float(gate_lr), float(dual_lr), dual_restarts
        self.seed = check_int("seed", seed, minimum=0)
        self.log_alpha: dict[str, Tensor] = {}
        self._gate_optimizer: torch.optim.Optimizer | None = None
        self._layers: dict[str, nn.Module] = {}
        self._candidate: nn.Module | None = None
        self.add_state("multipliers", {})
        self.add_state("gates", {})
        self.add_state("gate_optimizer", {})
        self.add_state("purged", False)
        self.add_state("last_gate_step", -1)
        self.add_state("generator", None)

    @property
    def current_target(self) -> float | None:
        return self.sparsity

    def validate(self, params: Mapping[str, Tensor]) -> None:
        assert self._candidate is not None
        modules = dict(self._candidate.named_modules())
        for name in params:
            owner, _, leaf = name.rpartition(".")
            if leaf != "weight" or not isinstance(modules.get(owner), (nn.Linear, nn.modules.conv._ConvNd)):
                raise ConfigError(
                    f"ControlledSparsity gates the weights of Linear and Conv layers; {name!r} is not one. Leave it "
                    "out with `exclude`."
                )

    def select(self, module: nn.Module) -> dict[str, Tensor]:
        self._candidate = module
        return super().select(module)

    def memory_bytes(self, params: Mapping[str, Tensor]) -> int:
        return sum(3 * 4 * p.numel() for p in params.values())

    # --- set-up ------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        super().setup(trainer, pl_module, stage)
        if not self.log_alpha:
            initial = torch.Generator().manual_seed(self.seed)
            self.log_alpha = {
                key: init_log_alpha(shape, self.droprate_init, initial).to(pl_module.device).requires_grad_()
                for key, shape in self.gate_shapes().items()
            }
            self._gate_optimizer = torch.optim.Adam(list(self.log_alpha.values()), lr=self.gate_lr)
            self.multipliers = {key: 0.0 for key in self._constraints()}
        if self.gates:  # restored from a checkpoint before setup ran
            self._restore_gates()
        if not self.purged:
            self.install_gates(pl_module)

    def gate_shapes(self) -> dict[str, torch.Size]:
        """One gate tensor per selected weight, shaped like it."""
        params = self.params()
        return {n: params[n].shape for n in self.names}

    def install_gates(self, pl_module: pl.LightningModule) -> None:
        """Compute with the gated weights during ``fit``: each gated layer's ``forward`` replaced on the instance."""
        modules = dict(pl_module.named_modules())
        self._layers = {n: modules[n.rpartition(".")[0]] for n in self.names}
        for name, layer in self._layers.items():
            layer.forward = self._gated_forward(layer, name)  # type: ignore[method-assign]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning moves the module to its device after ``setup``: the gates, their optimizer state and the
        sampling generator (a checkpoint's state included) follow it here."""
        super().on_fit_start(trainer, pl_module)
        device = pl_module.device
        if not isinstance(self.generator, torch.Generator) or self.generator.device != device:
            saved = self.generator
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            if isinstance(saved, Tensor):
                self.generator.set_state(saved.cpu())
        for gate in self.log_alpha.values():
            gate.data = gate.data.to(device)
        if self._gate_optimizer is not None:
            for state in self._gate_optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and key != "step":
                        state[key] = value.to(device)

    def _constraints(self) -> list[str]:
        return list(self.gate_shapes()) if self.constraint == "layer" else ["model"]

    def _gated_forward(self, layer: nn.Module, name: str) -> Any:
        log_alpha = self.log_alpha[name]

        def forward(x: Tensor) -> Tensor:
            gate = sample_gates(log_alpha, self.generator) if layer.training else eval_gates(log_alpha)
            weight = layer.weight * gate.to(layer.weight.dtype)
            if isinstance(layer, nn.Linear):
                return F.linear(x, weight, layer.bias)
            return layer._conv_forward(x, weight, layer.bias)

        return forward

    def remove_gates(self) -> None:
        """Give the gated layers their own ``forward`` back."""
        for layer in self._layers.values():
            layer.__dict__.pop("forward", None)
        self._layers = {}

    # --- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.log_alpha:
            self.gates = {n: a.detach().cpu().clone() for n, a in self.log_alpha.items()}
            self.gate_optimizer = self._gate_optimizer.state_dict() if self._gate_optimizer is not None else {}
        return super().state_dict()

    def _load_now(self, state: Mapping[str, Any]) -> None:
        super()._load_now(state)
        if self.log_alpha and self.gates:
            self._restore_gates()
        if self.purged:
            self.remove_gates()

    def _restore_gates(self) -> None:
        with torch.no_grad():
            for name, value in self.gates.items():
                self.log_alpha[name].copy_(value)
        if self.gate_optimizer and self._gate_optimizer is not None:
            self._gate_optimizer.load_state_dict(self.gate_optimizer)

    # --- the optimization --------------------------------------------------------------------------------------

    def densities(self) -> dict[str, Tensor]:
        """Expected density per constraint (differentiable in the gates)."""
        probabilities = {n: gate_probability(a) for n, a in self.log_alpha.items()}
        if self.constraint == "layer":
            return {n: p.mean() for n, p in probabilities.items()}
        total = sum(p.numel() for p in probabilities.values())
        return {"model": sum(p.sum() for p in probabilities.values()) / total}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.purged and trainer.global_step != self.last_gate_step:
            self.last_gate_step = trainer.global_step
            self._gate_step(trainer, pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _gate_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._gate_optimizer is not None
        gates = list(self.log_alpha.values())
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in gates]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            grads = [g / scaler.get_scale() for g in grads]
        grads = mean_over_ranks(trainer, grads)
        self._gate_optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(g).all()) for g in grads):  # a step AMP skips: leave gates and multipliers
            return
        for gate, grad in zip(gates, grads, strict=True):
            gate.grad = grad
        target = 1.0 - self.sparsity
        densities = self.densities()
        lagrangian = sum(self.multipliers[k] * d for k, d in densities.items())
        if isinstance(lagrangian, Tensor):
            lagrangian.backward()
        self._gate_optimizer.step()
        self._gate_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for gate in gates:
                gate.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        for key, density in densities.items():
            self.multipliers[key] = dual_step(
                self.multipliers[key], float(density.detach()) - target, self.dual_lr, self.dual_restarts
            )
        if self.log_sparsity:
            self._log(pl_module)

    def expected_density(self) -> float:
        """The expected fraction of open gates over all selected weights."""
        with torch.no_grad():
            opened = sum(float(gate_probability(a).sum()) for a in self.log_alpha.values())
        return opened / max(sum(a.numel() for a in self.log_alpha.values()), 1)

    def _log(self, pl_module: pl.LightningModule) -> None:
        pl_module.log("l0/expected_density", self.expected_density(), on_step=True, on_epoch=False)
        for key, multiplier in self.multipliers.items():
            suffix = "" if key == "model" else f"/{key}"
            pl_module.log(f"l0/multiplier{suffix}", multiplier, on_step=True, on_epoch=False)

    # --- the end -----------------------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.purged and self.log_alpha:
            self.purge(trainer)
        super().on_fit_end(trainer, pl_module)

    def purge(self, trainer: pl.Trainer | None = None) -> float:
        """Fold the evaluation gates into the weights (exact zeros where a gate is closed), install those zeros as
        the masks, give the layers their own ``forward`` back; returns the fraction of weights left non-zero."""
        params = self.params()
        with torch.no_grad():
            for name, mask in self.fold_gates(params).items():
                self.mask_set.update(name, mask)
        self.mask_set.apply_to_weights(params, self.names)
        if trainer is not None:
            for optimizer in trainer.optimizers:
                self.mask_set.apply_to_optimizer_state(optimizer, params, self.names)
        self.remove_gates()
        self.purged = True
        kept = self.purged_density()
        if trainer is not None and self.log_sparsity:
            for logger in trainer.loggers:
                logger.log_metrics({"l0/purged_density": kept}, step=trainer.global_step)
        return kept

    def fold_gates(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """w <- w * (evaluation gate) for every gated weight; returns the masks (True where the gate is open)."""
        masks = {}
        for name in self.names:
            gate = eval_gates(self.log_alpha[name]).to(params[name].dtype)
            params[name].mul_(gate)
            masks[name] = gate > 0
        return masks

    def purged_density(self) -> float:
        """The fraction of the gated weights that are not zero."""
        params = self.params()
        return sum(int(params[n].count_nonzero()) for n in self.names) / max(self.num_selected, 1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_gates()
        super().teardown(trainer, pl_module, stage)


class StructuredControlledSparsity(ControlledSparsity, ChannelMethod):
    """Constrained L0 on channels: what ``ControlledSparsity(sparsity, structured=True)`` returns.

    One hard-concrete gate per channel of each selected channel group (the groups of
    :class:`~sparse_lightning.callbacks.ChannelPruning`: a Linear layer's output neurons, which are the next layer's
    input neurons, or a convolution's output channels, with everything coupled to them), as the paper's structured
    experiments gate output channels of convolutions and input neurons of Linear layers (Louizos et al.'s group
    sparsity). The gate multiplies the channel after its normalization layer when the group has one (a gate before
    batch normalization would be divided out again in training mode), else the producers' outputs; one noise draw
    per group and training batch, so the producers of a residual sum share their gate. The constraint is the expected
    fraction of open channel gates <= 1 - ``sparsity``, per group (``constraint="layer"``) or over all selected
    channels (``"model"``); gates, multipliers, dual restarts and learning rates as :class:`ControlledSparsity`.

    At the end of ``fit`` the evaluation gates are folded into the normalization's weight and bias (or the
    producers' rows and biases), and each closed channel is removed as a whole: its channel mask zeroes the
    producer rows, biases, normalization entries and every consumer's input columns, so ``sparse_lightning.compact``
    (or ``sparse-lightning export --compact``) gives the smaller model. ``l0/purged_density`` is then the fraction
    of channels kept. Not covered: the network's input features (not a channel group), and a normalization layer
    without affine parameters after a producer (the gate sits before it and is divided out).

    Args:
        sparsity: 1 - the target expected fraction of open channel gates, in [0, 1).
        constraint, droprate_init, gate_lr, dual_lr, dual_restarts, seed: as :class:`ControlledSparsity`.
        include, exclude: patterns on the names of a group's producer parameters (as ``ChannelPruning``'s).
        log_sparsity: as every method.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        structured: bool = True,
        constraint: str = "layer",
        droprate_init: float = 0.5,
        gate_lr: float = 1e-2,
        dual_lr: float = 0.1,
        dual_restarts: bool = True,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_sparsity: bool = True,
    ) -> None:
        ChannelMethod.__init__(self, cost="channels", include=include, exclude=exclude, log_sparsity=log_sparsity)
        self.sparsity = check_fraction("sparsity", sparsity)
        self.init_gates(constraint, droprate_init, gate_lr, dual_lr, dual_restarts, seed)
        self._noise: dict[str, Tensor] = {}
        self._gate_handles: list[Any] = []

    def describe(self) -> str:
        return f"hard-concrete gate per channel, expected open fraction <= {1 - self.sparsity:g} per {self.constraint}"

    def memory_bytes(self, params: Mapping[str, Tensor]) -> int:
        return sum(3 * 4 * g.channels for g in self.groups)

    def gate_shapes(self) -> dict[str, torch.Size]:
        return {g.name: torch.Size([g.channels]) for g in self.groups}

    def _gated_members(self, group: ChannelGroup) -> list[Member]:
        """Where the group's gate acts: its normalization weights' layers, else its producers."""
        return group.role("norm_weight") or group.role("producer")

    def install_gates(self, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        self.remove_gates()
        for group in self.groups:
            for member in self._gated_members(group):
                layer = modules[member.param.rpartition(".")[0]]
                where = torch.full((layer_width(layer, member),), group.channels, dtype=torch.long)
                where[member.index] = member.channel
                self._gate_handles.append(layer.register_forward_hook(self._gate_hook(group.name, where)))

    def _gate_hook(self, group: str, where: Tensor) -> Any:
        index = {"where": where}  # moved to the gates' device once, not on every forward

        def hook(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            log_alpha = self.log_alpha[group]
            if layer.training:
                if group not in self._noise:
                    self._draw_noise()
                gate = hard_concrete(log_alpha, self._noise[group])
            else:
                gate = eval_gates(log_alpha)
            if index["where"].device != gate.device:
                index["where"] = index["where"].to(gate.device)
            positions = torch.cat([gate, gate.new_ones(1)])[index["where"]].to(output.dtype)
            dim = output.dim() - 1 if isinstance(layer, nn.Linear) else 1
            shape = [1] * output.dim()
            shape[dim] = -1
            return output * positions.view(shape)

        return hook

    def _draw_noise(self) -> None:
        self._noise = {
            name: gate_noise(a.shape, self.generator, a.device, a.dtype) for name, a in self.log_alpha.items()
        }

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        if not self.purged:
            self._draw_noise()

    def remove_gates(self) -> None:
        for handle in self._gate_handles:
            handle.remove()
        self._gate_handles = []

    def fold_gates(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fold each group's evaluation gates where they act and close the channels whose gate is 0 (one, the most
        open, stays in a group whose gates all closed); returns the channel masks as element masks."""
        for group in self.groups:
            gate = eval_gates(self.log_alpha[group.name]).detach().cpu()
            scaled = {m.param.rpartition(".")[0] for m in self._gated_members(group)}
            roles = ("norm_weight", "norm_bias") if group.role("norm_weight") else ("producer", "bias")
            for member in group.role(*roles):
                if member.param.rpartition(".")[0] in scaled:
                    moved = params[member.param].movedim(member.dim, 0)
                    factor = gate[member.channel].to(moved)
                    moved[member.index] *= factor.view(-1, *[1] * (moved.dim() - 1))
            keep = gate > 0
            if not keep.any():
                keep[int(self.log_alpha[group.name].detach().argmax())] = True
            self.keeps[group.name] = keep
        return channel_masks(self.groups, self.keeps, {n: params[n].shape for n in self.names})

    def purged_density(self) -> float:
        """The fraction of the selected channels kept."""
        return sum(int(k.sum()) for k in self.keeps.values()) / max(sum(g.channels for g in self.groups), 1)


def layer_width(layer: nn.Module, member: Member) -> int:
    """The size of the output dimension a gate scales: a norm's channels, a Linear's outputs, a conv's channels."""
    return int(getattr(layer, member.param.rpartition(".")[2]).shape[member.dim])
