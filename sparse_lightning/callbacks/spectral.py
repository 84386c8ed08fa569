"""Spectral-radius regularization of the loss Hessian (Sandler, Klabjan & Luo, arXiv 2102.11210)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lightning.callbacks.base import MethodCallback, check_strategy, mean_over_ranks, training_loss
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, check_int
from sparse_lightning.core.masks import masks_of
from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.spectral import spectral_radius, spectral_radius_gradient
from sparse_lightning.core.targets import select_parameters


@register("spectral_hessian")
class SpectralHessianRegularization(MethodCallback):
    """Flatter minima by penalizing the Hessian's spectral radius: Sandler, Klabjan & Luo, "Non-Convex Optimization
    with Spectral Radius Regularization" (arXiv 2102.11210).

    Every ``every`` optimizer steps the training loss of the step's (last) batch is evaluated again with a graph
    (the user's backward has freed its own; normalization buffers are restored afterwards, so the extra forward
    changes no running statistics, and batch normalization runs as elementary operations, since the fused kernel
    has no third derivative), rho(H) of the selected parameters is estimated by power iteration on
    Hessian-vector products (:mod:`sparse_lightning.core.spectral`, float64 vector arithmetic, warm-started from the
    previous eigenvector, ``tolerance`` and ``max_iterations`` as Sandler's code: 1e-3 and 1000), and when rho exceeds
    ``bound`` K the gradient of ``strength`` x (rho - K), mu v^T (dH/d theta) v, is added to the parameters'
    gradients before the optimizer steps (one more, third-order, backward). An estimate that did not converge is
    discarded (no penalty that step) and counted (``spectral/unconverged``). Logged: ``spectral/rho`` and
    ``spectral/iterations``. Under DDP each rank estimates on its own batch and the penalty gradients are averaged
    over ranks (every rank takes part in the average at every regularized step, so none waits on another). Entries
    masked by a pruning method get no penalty gradient (they stay exactly zero).

    Defaults: mu 0.01 and K 10 lie in Sandler's ranges (mu 5e-4 to 0.1, K in {0, 1, 2, 10, 100, 250}); ``every=1``
    regularizes every step as the paper does.

    Not built yet, and refused: ``method="kfac"`` (the Kronecker-factored estimate exists as
    :func:`~sparse_lightning.core.spectral.kronecker_radius`, without its penalty gradient) and ``sparsity > 0``
    (Ebrahimi & Klabjan's neuron pruning).

    Args:
        strength: mu, the penalty's weight.
        bound: K; no penalty while rho <= K.
        every: regularize every this many optimizer steps.
        method: ``hvp`` (power iteration on Hessian-vector products).
        sparsity: fraction of neurons pruned by the end (only 0, regularization alone, is built).
        tolerance, max_iterations: the power iteration's stopping rule.
        seed: seeds the first power iteration's random start.
        include, exclude: parameter-name patterns (default: every Linear and Conv weight).
        log: log rho, the iterations and the discarded estimates.
    """

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
    ) -> None:
        super().__init__()
        for name, value in (("strength", strength), ("bound", bound), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}.")
        if method == "kfac":
            raise ConfigError("`method='kfac'` (the Kronecker-factored penalty) is not built yet; use 'hvp'.")
        if method != "hvp":
            raise ConfigError(f"`method` must be 'hvp', got {method!r}.")
        if sparsity != 0.0:
            raise ConfigError("Neuron pruning (`sparsity` > 0) is not built yet; use sparsity=0.0 (regularize only).")
        self.strength, self.bound, self.tolerance = float(strength), float(bound), float(tolerance)
        self.every = check_int("every", every, minimum=1)
        self.max_iterations = check_int("max_iterations", max_iterations, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.method, self.sparsity = method, 0.0
        self.include, self.exclude, self.log = include, exclude, log
        self.names: list[str] = []
        self._batch: tuple[Any, int] | None = None
        self.add_state("vector", [])
        self.add_state("rho", float("nan"))
        self.add_state("unconverged", 0)
        self.add_state("last_step", -1)
        self.add_state("generator", torch.Generator().manual_seed(seed))

    def select(self, module: nn.Module) -> list[str]:
        return select_parameters(module, self.include, self.exclude)

    def plan(self, module: nn.Module, timeline: Timeline) -> MethodPlan:
        params = dict(module.named_parameters())
        names = self.select(module)
        return MethodPlan(
            method=type(self).__name__,
            parameters={n: tuple(params[n].shape) for n in names},
            target=None,
            notes=[f"mu {self.strength:g} x max(rho(H) - {self.bound:g}, 0) every {self.every} step(s)"],
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        self.names = self.select(pl_module)
        self._module = pl_module
        if self._pending_state is not None:
            self._load_now(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._batch = (batch, idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every or self._batch is None:
            return
        self.last_step = step
        named = dict(pl_module.named_parameters())
        params = [named[n] for n in self.names]
        penalty = mean_over_ranks(trainer, self._penalty_gradient(pl_module, params))
        masks = masks_of(pl_module)
        with torch.no_grad():
            for name, p, g in zip(self.names, params, penalty, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g * masks[name].to(g.device) if name in masks else g, alpha=self.strength)

    def _penalty_gradient(self, pl_module: pl.LightningModule, params: list[Tensor]) -> list[Tensor]:
        """d rho / d theta on the step's batch when the estimate converged above the bound, else zeros."""
        batch, idx = self._batch  # type: ignore[misc]
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        try:
            with torch.enable_grad():
                with _differentiable_batch_norm():
                    loss = training_loss(pl_module, batch, idx, type(self).__name__)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                start = [v.to(p) for v, p in zip(self.vector, params, strict=True)] if self.vector else None
                estimate = spectral_radius(grads, params, start, self.tolerance, self.max_iterations, self.generator)
                zeros = [torch.zeros_like(p) for p in params]
                if not estimate.converged:
                    self.unconverged += 1
                    result = zeros
                else:
                    self.rho = estimate.rho
                    self.vector = [v.detach().cpu() for v in estimate.vector]
                    above = estimate.rho > self.bound
                    result = spectral_radius_gradient(grads, params, estimate) if above else zeros
        finally:
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    buffer.copy_(buffers[name])
        if self.log:
            pl_module.log("spectral/rho", self.rho, on_step=True, on_epoch=False)
            pl_module.log("spectral/iterations", float(estimate.iterations), on_step=True, on_epoch=False)
            pl_module.log("spectral/unconverged", float(self.unconverged), on_step=True, on_epoch=False)
        return [g.detach() for g in result]

    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {}
        return {"names": list(self.names), **self.states()}

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                f"The checkpoint's SpectralHessianRegularization covers {state['names']}, but this one selects "
                f"{self.names}. Use the same `include`/`exclude` as the run that saved it."
            )
        self.load_states(state)


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
