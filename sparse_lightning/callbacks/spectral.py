"""Spectral-radius regularization of the loss Hessian (Sandler, Klabjan & Luo, arXiv 2102.11210), by power
iteration or Kronecker factors, and neuron pruning on the Kronecker-factored curvature (Ebrahimi & Klabjan, arXiv
2111.08577)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lightning.callbacks.base import MethodCallback, Variants, check_strategy, mean_over_ranks, training_loss
from sparse_lightning.callbacks.channels import COSTS, ChannelMethod
from sparse_lightning.callbacks.gradual import GradualSchedule
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, check_choice, check_int
from sparse_lightning.core.masks import masks_of
from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeValue
from sparse_lightning.core.spectral import (
    kronecker_factors,
    kronecker_radius,
    layer_rows,
    neuron_saliency,
    output_rows,
    spectral_radius,
    spectral_radius_gradient,
)
from sparse_lightning.core.targets import select_parameters
from sparse_lightning.structure.groups import ChannelGroup, channel_masks
from sparse_lightning.structure.selection import select_channels
from sparse_lightning.structure.tracer import eager

METHODS = ("hvp", "kfac")
PRUNING_ARGUMENTS = ("cost", "round_to", "start", "end", "prune_every", "curve", "compact_during_fit")
KFAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@register("spectral_hessian")
class SpectralHessianRegularization(Variants, MethodCallback):
    """Flatter minima by penalizing the Hessian's spectral radius: Sandler, Klabjan & Luo, "Non-Convex Optimization
    with Spectral Radius Regularization" (arXiv 2102.11210); with ``sparsity`` > 0, neuron pruning during training
    as Ebrahimi & Klabjan, "Neuron-based Pruning of Deep Neural Networks with Better Generalization using Kronecker
    Factored Curvature Approximation" (arXiv 2111.08577): see :class:`SpectralNeuronPruning`, the class such a call
    returns.

    Every ``every`` optimizer steps the training loss of the step's (last) batch is evaluated again with a graph
    (the user's backward has freed its own; normalization buffers are restored afterwards, so the extra forward
    changes no running statistics), rho of the selected parameters' curvature is estimated, and when rho exceeds
    ``bound`` K the gradient of ``strength`` x (rho - K) is added to the parameters' gradients before the optimizer
    steps. Logged: ``spectral/rho`` (and for ``hvp`` ``spectral/iterations`` and ``spectral/unconverged``). Under DDP
    each rank estimates on its own batch and the penalty gradients are averaged over ranks. Entries masked by a
    pruning method get no penalty gradient (they stay exactly zero).

    ``method="hvp"`` (the paper): rho(H) by power iteration on Hessian-vector products
    (:mod:`sparse_lightning.core.spectral`, float64 vector arithmetic, warm-started from the previous eigenvector,
    ``tolerance`` and ``max_iterations`` as Sandler's code: 1e-3 and 1000; batch normalization runs as elementary
    operations, since the fused kernel has no third derivative); the penalty's gradient mu v^T (dH/d theta) v is one
    more, third-order, backward. An estimate that did not converge is discarded (no penalty that step) and counted.

    ``method="kfac"``: each selected layer's curvature block is K-FAC's A (x) G (Martens & Grosse 2015;
    convolutions as KFC, Grosse & Martens 2016), whose spectral radius is rho(A) rho(G); the block-diagonal
    approximation's radius is the largest layer's, and its gradient (through the activations in A and the output
    gradients in G, one second-order backward) is penalized. No power iteration: one backward with a graph and an
    eigendecomposition of each factor. Only the weights of Linear and Conv1d/Conv2d layers (ungrouped, zero
    padding) can be selected. A layer's G uses the batch-mean loss's output gradients times the batch size (the
    per-sample gradients of a mean loss).

    ``strength=0`` computes nothing (with ``sparsity`` > 0: neuron pruning without the regularizer). Defaults: mu
    0.01 and K 10 lie in Sandler's ranges (mu 5e-4 to 0.1, K in {0, 1, 2, 10, 100, 250}); ``every=1``
    regularizes every step as the paper does.

    Args:
        strength: mu, the penalty's weight.
        bound: K; no penalty while rho <= K.
        every: regularize every this many optimizer steps.
        method: ``hvp`` (power iteration on Hessian-vector products) or ``kfac`` (Kronecker factors).
        sparsity: fraction of neurons (of ``cost``) pruned by the end; 0 (the default) regularizes without pruning.
        tolerance, max_iterations: the power iteration's stopping rule (``hvp``).
        seed: seeds the first power iteration's random start.
        include, exclude: parameter-name patterns (default: every Linear and Conv weight).
        log: log rho, the iterations and the discarded estimates.
        cost, round_to, start, end, prune_every, curve, compact_during_fit: neuron pruning only
            (:class:`SpectralNeuronPruning`).
    """

    @classmethod
    def variant(cls, kwargs: Mapping[str, Any]) -> type:
        pruning = cls is SpectralHessianRegularization and kwargs.get("sparsity", 0.0) not in (0, 0.0)
        return SpectralNeuronPruning if pruning else cls

    def __init__(
        self,
        strength: float = 0.01,
        *,
        bound: float = 10.0,
        every: int = 1,
        method: str = "hvp",
        sparsity: float = 0.0,
        tolerance: float = 1e-3,
        max_iterations: int = 1000,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log: bool = True,
        cost: str | None = None,
        round_to: int | None = None,
        start: TimeValue | None = None,
        end: TimeValue | None = None,
        prune_every: TimeValue | None = None,
        curve: str | None = None,
        compact_during_fit: bool | None = None,
    ) -> None:
        values = (cost, round_to, start, end, prune_every, curve, compact_during_fit)
        pruning = dict(zip(PRUNING_ARGUMENTS, values, strict=True))
        given = [name for name, value in pruning.items() if value is not None]
        if given:
            raise ConfigError(
                f"{given} configure neuron pruning, which runs only with `sparsity` > 0 (got {sparsity!r})."
            )
        MethodCallback.__init__(self)
        self.sparsity = 0.0
        self.init_regularizer(strength, bound, every, method, tolerance, max_iterations, seed, include, exclude, log)

    def init_regularizer(
        self,
        strength: float,
        bound: float,
        every: int,
        method: str,
        tolerance: float,
        max_iterations: int,
        seed: int,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        log: bool,
    ) -> None:
        """Check and store the regularizer's arguments and declare its state."""
        for name, value in (("strength", strength), ("bound", bound), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}.")
        self.strength, self.bound, self.tolerance = float(strength), float(bound), float(tolerance)
        self.every = check_int("every", every, minimum=1)
        self.max_iterations = check_int("max_iterations", max_iterations, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.method = check_choice("method", method, METHODS)
        self.include, self.exclude, self.log = include, exclude, log
        self.regularized_names: list[str] = []
        self._batch: tuple[Any, int] | None = None
        self.add_state("vector", [])
        self.add_state("rho", float("nan"))
        self.add_state("unconverged", 0)
        self.add_state("last_step", -1)
        self.add_state("generator", torch.Generator().manual_seed(seed))

    def regularized(self, module: nn.Module) -> list[str]:
        """The names of the parameters whose curvature is penalized (checked for ``kfac``)."""
        names = select_parameters(module, self.include, self.exclude)
        if self.method == "kfac":
            modules = dict(module.named_modules())
            for name in names:
                owner, _, leaf = name.rpartition(".")
                layer = modules.get(owner)
                if leaf != "weight" or not isinstance(layer, KFAC_LAYERS):
                    raise ConfigError(
                        f"method='kfac' has Kronecker factors for the weights of Linear and Conv1d/Conv2d layers; "
                        f"{name!r} is not one. Leave it out with `exclude`, or use method='hvp'."
                    )
                if isinstance(layer, nn.modules.conv._ConvNd) and (layer.groups != 1 or layer.padding_mode != "zeros"):
                    raise ConfigError(
                        f"method='kfac' needs ungrouped convolutions with zero padding; {owner!r} has groups="
                        f"{layer.groups}, padding_mode={layer.padding_mode!r}. Leave it out with `exclude`, or use "
                        "method='hvp'."
                    )
        return names

    def regularizer_note(self) -> str:
        return f"mu {self.strength:g} x max(rho - {self.bound:g}, 0) ({self.method}) every {self.every} step(s)"

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        params = dict(module.named_parameters())
        return MethodPlan(
            method=type(self).__name__,
            parameters={n: tuple(params[n].shape) for n in self.regularized(module)},
            target=None,
            notes=[self.regularizer_note()],
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.regularized_names = self.regularized(pl_module)
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        self._module = pl_module
        if self._pending_state is not None:
            self._load_now(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        self._batch = (batch, idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self.strength > 0 and step != self.last_step and step % self.every == 0 and self._batch is not None:
            self.last_step = step
            self._regularize(trainer, pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _regularize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        params = [named[n] for n in self.regularized_names]
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        try:
            with torch.enable_grad():
                if self.method == "hvp":
                    penalty = self._hvp_penalty(pl_module, params)
                else:
                    penalty = self._kfac_penalty(pl_module, params)
        finally:
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    buffer.copy_(buffers[name])
        penalty = mean_over_ranks(trainer, [g.detach() for g in penalty])
        masks = masks_of(pl_module)
        with torch.no_grad():
            for name, p, g in zip(self.regularized_names, params, penalty, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g * masks[name].to(g.device) if name in masks else g, alpha=self.strength)
        if self.log:
            pl_module.log("spectral/rho", self.rho, on_step=True, on_epoch=False)

    def _batch_loss(self, pl_module: pl.LightningModule) -> Tensor:
        """The step's loss again, through the module's own eager methods (a graph compiled by ``Trainer.fit`` can
        not be differentiated twice)."""
        batch, idx = self._batch  # type: ignore[misc]
        with eager(pl_module):
            return training_loss(pl_module, batch, idx, type(self).__name__)

    def _hvp_penalty(self, pl_module: pl.LightningModule, params: list[Tensor]) -> list[Tensor]:
        """d rho(H) / d theta on the step's batch when the estimate converged above the bound, else zeros."""
        with _differentiable_batch_norm():
            loss = self._batch_loss(pl_module)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        warm = self.vector and all(v.shape == p.shape for v, p in zip(self.vector, params, strict=False))
        start = [v.to(p) for v, p in zip(self.vector, params, strict=True)] if warm else None
        estimate = spectral_radius(grads, params, start, self.tolerance, self.max_iterations, self.generator)
        result = [torch.zeros_like(p) for p in params]
        if not estimate.converged:
            self.unconverged += 1
        else:
            self.rho = estimate.rho
            self.vector = [v.detach().cpu() for v in estimate.vector]
            if estimate.rho > self.bound:
                result = spectral_radius_gradient(grads, params, estimate)
        if self.log:
            pl_module.log("spectral/iterations", float(estimate.iterations), on_step=True, on_epoch=False)
            pl_module.log("spectral/unconverged", float(self.unconverged), on_step=True, on_epoch=False)
        return result

    def _kfac_penalty(self, pl_module: pl.LightningModule, params: list[Tensor]) -> list[Tensor]:
        """d max_l rho(A_l (x) G_l) / d theta on the step's batch when above the bound, else zeros."""
        modules = dict(pl_module.named_modules())
        layers = {n: modules[n.rpartition(".")[0]] for n in self.regularized_names}
        seen: dict[str, tuple[Tensor, Tensor]] = {}

        def capture(name: str) -> Any:
            def hook(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                if name in seen:
                    raise ConfigError(
                        f"method='kfac': layer {name.rpartition('.')[0]!r} runs more than once in a forward pass "
                        "(shared weights have no single pair of Kronecker factors); use method='hvp'."
                    )
                seen[name] = (args[0], output)

            return hook

        handles = [layer.register_forward_hook(capture(n)) for n, layer in layers.items()]
        try:
            loss = self._batch_loss(pl_module)
        finally:
            for handle in handles:
                handle.remove()
        names = list(seen)
        output_grads = torch.autograd.grad(loss, [seen[n][1] for n in names], create_graph=True)
        radii = []
        for name, grad in zip(names, output_grads, strict=True):
            layer, (inputs, _) = layers[name], seen[name]
            factor_a, factor_g = kronecker_factors(
                layer_rows(layer, inputs), output_rows(layer, grad), inputs.shape[0], layer.bias is not None
            )
            radii.append(kronecker_radius(factor_a, factor_g))
        rho = max(radii, key=lambda r: float(r.detach()))
        self.rho = float(rho.detach())
        if self.rho <= self.bound:
            return [torch.zeros_like(p) for p in params]
        gradient = torch.autograd.grad(rho, params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(gradient, params, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._module is None:
            return {}
        return {**state, "regularized": list(self.regularized_names), **self.states()}

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if list(state["regularized"]) != self.regularized_names:
            raise ConfigError(
                f"The checkpoint's {type(self).__name__} regularizes {state['regularized']}, but this one selects "
                f"{self.regularized_names}. Use the same `include`/`exclude` as the run that saved it."
            )
        super()._load_now(state)


class SpectralNeuronPruning(SpectralHessianRegularization, GradualSchedule, ChannelMethod):
    """Spectral-radius regularization with neuron pruning during training (Ebrahimi & Klabjan, arXiv 2111.08577):
    what ``SpectralHessianRegularization(sparsity > 0, ...)`` returns.

    The regularizer is :class:`SpectralHessianRegularization`'s. Neurons (a Linear layer's outputs, a
    convolution's channels: whole channel groups, as :class:`~sparse_lightning.callbacks.ChannelPruning`'s, so a
    removed neuron's weight row, bias, normalization entries and every consumer's input columns are exact zeros
    together) leave on Zhu & Gupta's gradual schedule (``start``, ``end``, every ``prune_every`` steps, ``curve``)
    until ``sparsity`` of ``cost`` (default: of the channels) is gone. The lowest Kronecker-factored saliencies
    leave first, ranked globally (the saliency is a loss change, on one scale across layers).

    The saliency. The paper removes the neurons whose removal changes the loss least under K-FAC's curvature; its
    exact expression and code are not public. Implemented is the OBD reading of that sentence (LeCun et al. 1990:
    removing a neuron costs 1/2 delta^T H delta with delta its weights, here with H's K-FAC block A (x) G): for output
    neuron j with weight row and bias w~_j, 1/2 G_jj w~_j^T A w~_j = 1/2 E[sum_t s_j^2] E[g_j^2], the neuron's
    mean squared pre-activation output times the mean squared per-sample loss gradient at it
    (:func:`~sparse_lightning.core.spectral.neuron_saliency`), summed over a group's producers. Both factors are
    averaged over every training forward since the last event (K-FAC's running estimates; in DDP over ranks too),
    so the saliency needs no extra pass and forms no factor. Not in it: the normalization parameters removed with
    the neuron (their rows of H are not in A (x) G), and the OBS correction of the remaining weights (pruned
    neurons are zeroed, not compensated, as in OBD).

    Args:
        sparsity: fraction of ``cost`` removed at ``end``, in (0, 1).
        cost: ``channels`` (neurons of the selected groups; default), ``flops`` or ``params``.
        round_to: kept neuron counts are multiples of this.
        start, end, prune_every, curve: the schedule (:class:`~sparse_lightning.callbacks.GradualMagnitudePruning`'s
            ``start``, ``end``, ``every`` and ``curve``); ``every`` is the regularizer's period here.
        compact_during_fit: remove pruned neurons from the training module after each event (single device).
        strength, bound, every, method, tolerance, max_iterations, seed, include, exclude, log: the regularizer's
            (``include``/``exclude`` also select the channel groups, by their producers' names).
    """

    costs = COSTS

    def __init__(
        self,
        strength: float = 0.01,
        *,
        bound: float = 10.0,
        every: int = 1,
        method: str = "hvp",
        sparsity: float = 0.5,
        tolerance: float = 1e-3,
        max_iterations: int = 1000,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log: bool = True,
        cost: str | None = "channels",
        round_to: int | None = 1,
        start: TimeValue | None = 0,
        end: TimeValue | None = 0.75,
        prune_every: TimeValue | None = 100,
        curve: str | None = "cubic",
        compact_during_fit: bool | None = False,
    ) -> None:
        # None (what a config file built from the regularizer's signature holds) means the default
        ChannelMethod.__init__(
            self,
            cost="channels" if cost is None else cost,
            round_to=1 if round_to is None else round_to,
            include=include,
            exclude=exclude,
            compact_during_fit=bool(compact_during_fit),
            log_sparsity=log,
        )
        start, end = 0 if start is None else start, 0.75 if end is None else end
        prune_every, curve = 100 if prune_every is None else prune_every, curve or "cubic"
        self.init_schedule(sparsity, 0.0, start, end, prune_every, curve)
        if self.sparsity == 0:
            raise ConfigError("SpectralNeuronPruning needs `sparsity` > 0; without pruning use the regularizer alone.")
        self.init_regularizer(strength, bound, every, method, tolerance, max_iterations, seed, include, exclude, log)
        self._capturing = True
        self._handles_capture: list[Any] = []
        self.add_state("output_squares", {})
        self.add_state("grad_squares", {})

    def describe(self) -> str:
        return "Kronecker-factored OBD saliency, global ranking"

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        plan = ChannelMethod.plan(self, module, timeline)
        plan.notes.append(self.regularizer_note())
        return plan

    def build_groups(self, module: nn.Module, inputs: Any, check: bool = True) -> None:
        super().build_groups(module, inputs, check)
        modules = dict(module.named_modules())
        for group in self.groups:
            for member in group.role("producer"):
                layer = modules.get(member.param.rpartition(".")[0])
                if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or member.dim != 0:
                    raise ConfigError(
                        f"SpectralNeuronPruning scores the output neurons of Linear and Conv layers; group "
                        f"{group.name!r} is produced by {member.param!r}. Leave it out with `exclude`."
                    )
        self._install_capture(module)

    # --- saliency ----------------------------------------------------------------------------------------------

    def _install_capture(self, module: nn.Module) -> None:
        for handle in self._handles_capture:
            handle.remove()
        modules = dict(module.named_modules())
        producers = dict.fromkeys(m.param for g in self.groups for m in g.role("producer"))
        self._handles_capture = [
            modules[name.rpartition(".")[0]].register_forward_hook(self._capture(name)) for name in producers
        ]

    def _capture(self, name: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            trainer = self._module.trainer if self._module is not None else None
            if (
                not self._capturing
                or not layer.training
                or not torch.is_grad_enabled()
                or trainer is None
                or self.end_step is None
                or trainer.global_step > self.end_step
            ):
                return
            samples = output.shape[0]
            rows = output_rows(layer, output.detach()).double()
            self._accumulate(self.output_squares, name, rows.square().sum(0) / samples)
            if output.requires_grad:
                scaler = getattr(trainer.precision_plugin, "scaler", None)

                def on_grad(grad: Tensor) -> None:
                    g = output_rows(layer, grad.detach()).double() * samples
                    if scaler is not None:
                        g = g / scaler.get_scale()
                    self._accumulate(self.grad_squares, name, g.square().sum(0) / g.shape[0])

                output.register_hook(on_grad)

        return hook

    @staticmethod
    def _accumulate(sums: dict[str, list[Any]], name: str, value: Tensor) -> None:
        """``sums[name]`` = [sum of the values, how many]."""
        total, count = sums.get(name, [0.0, 0])
        sums[name] = [value + (total.to(value) if isinstance(total, Tensor) else total), count + 1]

    def saliencies(self) -> dict[str, Tensor]:
        """Per selected group, each neuron's saliency from the factors averaged since the last event (and over
        ranks)."""
        names = list(dict.fromkeys(m.param for g in self.groups for m in g.role("producer")))
        params = self.params()
        flat = []
        for n in names:
            saliency = torch.zeros(params[n].shape[0], dtype=torch.float64, device=params[n].device)
            if n in self.output_squares and n in self.grad_squares:
                (a, a_count), (g, g_count) = self.output_squares[n], self.grad_squares[n]
                saliency = neuron_saliency(a.to(saliency) / a_count, g.to(saliency) / g_count)
            flat.append(saliency)
        if self._module is not None:
            flat = mean_over_ranks(self._module.trainer, flat)
        per_param = {n: f.cpu() for n, f in zip(names, flat, strict=True)}
        return {g.name: self._group_saliency(g, per_param) for g in self.groups}

    @staticmethod
    def _group_saliency(group: ChannelGroup, per_param: Mapping[str, Tensor]) -> Tensor:
        scores = torch.zeros(group.channels, dtype=torch.float64)
        for member in group.role("producer"):
            scores.index_add_(0, member.channel, per_param[member.param][member.index])
        return scores

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self._cost is not None
        self.keeps = select_channels(
            self.groups, self.saliencies(), self.keeps, self._cost, self.target_at(step), self.round_to, normalize=False
        )
        self.reset_scores()
        return channel_masks(self.groups, self.keeps, {n: params[n].shape for n in self.names})

    def reset_scores(self) -> None:
        self.output_squares, self.grad_squares = {}, {}

    def _regularize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._capturing = False
        try:
            super()._regularize(trainer, pl_module)
        finally:
            self._capturing = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles_capture:
            handle.remove()
        self._handles_capture = []
        super().teardown(trainer, pl_module, stage)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from elementary operations, differentiable to any order (the fused kernel stops at the
    second); running statistics are not updated (the caller restores them anyway)."""
    dims = [d for d in range(input.dim()) if d != 1]
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        mean, var = input.mean(dims), input.var(dims, unbiased=False)
    else:
        mean, var = running_mean, running_var
    out = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


@contextmanager
def _differentiable_batch_norm() -> Iterator[None]:
    original = F.batch_norm
    F.batch_norm = _batch_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        F.batch_norm = original
