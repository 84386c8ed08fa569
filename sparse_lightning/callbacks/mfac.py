"""M-FAC in the training loop (Frantar, Kurtic & Alistarh 2021): preconditioned steps and OBS pruning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from sparse_lightning.callbacks.base import MethodCallback, SparsityCallback, check_strategy, skip_optimizer_step
from sparse_lightning.callbacks.gradual import GradualMagnitudePruning
from sparse_lightning.callbacks.registry import register
from sparse_lightning.core.errors import ConfigError, check_int
from sparse_lightning.core.masks import masks_of
from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.schedules import TimeValue, next_event
from sparse_lightning.core.targets import select_parameters
from sparse_lightning.mfac import (
    SlidingInverseFisher,
    StaticInverseFisher,
    check_damp,
    flat_gradient,
    obs_saliency,
    obs_update,
    split_flat,
    window_bytes,
)


def flat_keep(module: torch.nn.Module, names: Sequence[str], params: Mapping[str, Tensor]) -> Tensor:
    """The masks of ``names`` as one bool vector (all True for a parameter without a mask)."""
    masks = masks_of(module)
    return torch.cat(
        [masks[n].reshape(-1) if n in masks else torch.ones(params[n].numel(), dtype=torch.bool) for n in names]
    ).to(next(iter(params.values())).device)


@register("mfac_preconditioner")
class MFACPreconditioner(MethodCallback):
    """Precondition any optimizer's step with M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv:2107.03356).

    In ``on_before_optimizer_step`` the gradient of the selected parameters (accumulated, unscaled and, under DDP,
    already averaged over ranks, so every rank's window is the same) is pushed into a sliding window of the last
    ``num_grads`` gradients and replaced by F^-1 g, F = damp * I + (1/m) sum_i g_i g_i^T; the user's optimizer then
    steps with it (SGD with its own momentum and weight decay, as configured). Defaults are the paper's (1024
    gradients, damp 1e-5) on CUDA; on the CPU the default window is 128 gradients (memory m x d float32 values).

    Sparse M-FAC: coordinates masked by any pruning callback are left out of the window and the product (their
    columns are cleared when they are pruned), so F is the Fisher of the kept weights and their update stays 0. Put
    this callback after the mask-producing callbacks in ``callbacks`` (it checks), so that RigL or SNIP read the
    raw gradient and the window sees the current mask.

    A step whose gradient is not finite is skipped (its gradients are set to ``None``), the window is left
    untouched, and ``mfac/skipped_steps`` is logged with a warning. The window, its position and the kept
    coordinates are saved in checkpoints (m x d values).

    Args:
        num_grads: the window length m (default 1024 on CUDA, 128 on the CPU).
        damp: lambda, the dampening (default 1e-5).
        block_size: block-diagonal F over consecutive blocks of this many coordinates (bounds the m x m work).
        include, exclude: parameter-name patterns; by default every parameter that requires a gradient (as the
            paper preconditions the whole model).
    """

    def __init__(
        self,
        num_grads: int | None = None,
        *,
        damp: float = 1e-5,
        block_size: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.num_grads = check_int("num_grads", num_grads, 1, allow_none=True)
        self.damp = check_damp(damp)
        self.block_size = check_int("block_size", block_size, 1, allow_none=True)
        if block_size is not None and num_grads is not None and block_size < num_grads:
            raise ConfigError(f"`block_size` {block_size} must be >= `num_grads` {num_grads}.")
        self.include, self.exclude = include, exclude
        self.names: list[str] = []
        self.add_state("fisher", None)
        self.add_state("keep", None)
        self.add_state("skipped_steps", 0)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def window_length(self, device: torch.device) -> int:
        """m: ``num_grads``, or the paper's 1024 on CUDA and 128 elsewhere (memory m x d float32 values)."""
        return self.num_grads or (1024 if device.type == "cuda" else 128)

    def select(self, module: torch.nn.Module) -> list[str]:
        """Names of the preconditioned parameters: ``include`` (default: all that require a gradient) less
        ``exclude``."""
        include = self.include or [n for n, p in module.named_parameters() if p.requires_grad]
        return select_parameters(module, include, self.exclude)

    def plan(self, module: torch.nn.Module, timeline: Timeline) -> MethodPlan:
        params = dict(module.named_parameters())
        names = self.select(module)
        dim = sum(params[n].numel() for n in names)
        device = next(iter(params.values())).device
        m = self.window_length(device)
        return MethodPlan(
            method=type(self).__name__,
            parameters={n: tuple(params[n].shape) for n in names},
            target=None,
            memory_bytes=window_bytes(m, dim, self.block_size),
            notes=[f"window of {m} gradients x {dim:,} coordinates, float32 ({device.type}), damp {self.damp:g}"],
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        mine = trainer.callbacks.index(self)
        later = [type(c).__name__ for c in trainer.callbacks[mine + 1 :] if isinstance(c, SparsityCallback)]
        if later:
            raise ConfigError(
                f"Put MFACPreconditioner after {', '.join(later)} in the trainer's callbacks: it replaces the "
                "gradient with F^-1 g, which mask-producing callbacks must not read."
            )
        self.names = self.select(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        dim = sum(params[n].numel() for n in self.names)
        device = pl_module.device
        m = self.window_length(device)
        self.fisher = SlidingInverseFisher(dim, m, self.damp, device, block_size=self.block_size)
        self.keep = torch.ones(dim, dtype=torch.bool, device=device)
        self._module = pl_module
        if self._pending_state is not None:
            self._load_now(self._pending_state)
            self._pending_state = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.fisher is not None and self.keep is not None
        named = dict(pl_module.named_parameters())
        params = [named[n] for n in self.names]
        if all(p.grad is None for p in params):
            return
        g = flat_gradient(params)
        if not torch.isfinite(g).all():
            self.skipped_steps += 1
            rank_zero_warn(
                f"MFACPreconditioner: the gradient at step {trainer.global_step} is not finite; the step is skipped "
                f"and the window left untouched ({self.skipped_steps} skipped so far)."
            )
            skip_optimizer_step(trainer)
            pl_module.log("mfac/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        keep = flat_keep(pl_module, self.names, named)
        if not torch.equal(keep, self.keep):
            self.fisher.clear_coordinates(self.keep & ~keep)
            self.keep = keep
        direction = self.fisher.update_ihvp(g * keep)
        for p, piece in zip(params, split_flat(direction, params), strict=True):
            if p.grad is not None:
                p.grad.copy_(piece)

    def state_dict(self) -> dict[str, Any]:
        if self.fisher is None:
            return {}
        return {"names": list(self.names), **self.states()}

    def _load_now(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                f"The checkpoint's MFACPreconditioner covers {state['names']}, but this one selects {self.names}. "
                "Use the same `include`/`exclude` as the run that saved it."
            )
        self.load_states(state)


@register("mfac_pruning")
class MFACPruning(GradualMagnitudePruning):
    """Gradual pruning with M-FAC / OBS saliency (Frantar et al. 2021; WoodFisher, Singh & Alistarh 2020; oBERT,
    Kurtic et al. 2022).

    The schedule, distribution, pattern and overrides are those of :class:`GradualMagnitudePruning` (one shared
    implementation). At each pruning event, from the last ``num_grads`` gradients (a static window, block-diagonal
    over ``block_size`` coordinates), the weights of lowest saliency w_q^2 / (2 [F^-1]_qq) are removed and the
    survivors get the OBS update dw = -F^-1 sum_q (w_q / [F^-1]_qq) e_q; the step from the current to the new
    sparsity is split into ``recomputations`` geometric steps in density, each recomputing F^-1 over the weights
    still kept, as in the reference pruner. Defaults are the reference's: 64 gradients, blocks of 128, damp 1e-5,
    16 recomputations, one global ranking.

    Deliberate differences from the reference: the gradients are those of the ``num_grads`` training steps that lead
    up to each event (the buffer is allocated only then, and saved in checkpoints), not extra mini-batches drawn at
    the event; the recomputations reuse them over the kept coordinates rather than drawing new ones; the optimizer
    state of surviving weights is kept (the reference rebuilds its optimizer after each pruning step).

    Args (besides those of :class:`GradualMagnitudePruning`):
        num_grads: gradients per event (m).
        damp: lambda of F = lambda * I + (1/m) G^T G.
        block_size: coordinates per block of the block-diagonal F (``None``: one dense block); blocks shorter than
            ``num_grads`` are inverted explicitly (oBERT: blocks of 50, 1024 gradients).
        recomputations: steps per event.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start: TimeValue = 0,
        end: TimeValue = 0.75,
        every: TimeValue = 100,
        curve: str = "cubic",
        distribution: str = "global",
        pattern: str = "unstructured",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        overrides: Mapping[str, float] | None = None,
        min_density: float = 0.0,
        num_grads: int = 64,
        damp: float = 1e-5,
        block_size: int | None = 128,
        recomputations: int = 16,
        log_sparsity: bool = True,
    ) -> None:
        super().__init__(
            sparsity,
            initial_sparsity=initial_sparsity,
            start=start,
            end=end,
            every=every,
            curve=curve,
            distribution=distribution,
            pattern=pattern,
            include=include,
            exclude=exclude,
            overrides=overrides,
            min_density=min_density,
            log_sparsity=log_sparsity,
        )
        self.num_grads = check_int("num_grads", num_grads, 1)
        self.damp = check_damp(damp)
        self.block_size = check_int("block_size", block_size, 1, allow_none=True)
        self.recomputations = check_int("recomputations", recomputations, 1)
        self.add_state("grads", None)
        self.add_state("filled", 0)
        self.add_state("next_row", 0)

    def memory_bytes(self, params: Mapping[str, Tensor]) -> int:
        """The gradient buffer, held only in the ``num_grads`` steps before each event: m x d float32."""
        return 4 * self.num_grads * sum(p.numel() for p in params.values())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        assert self.start_step is not None and self.end_step is not None and self.every_steps is not None
        event = next_event(step, self.start_step, self.end_step, self.every_steps)
        if event is not None and event - step < self.num_grads and step != self.last_update_step:
            self._collect(pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _collect(self, pl_module: pl.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        g = flat_gradient([named[n] for n in self.names])
        if not torch.isfinite(g).all():
            rank_zero_warn("MFACPruning: a gradient that is not finite was left out of the M-FAC window.")
            return
        if self.grads is None:
            self.grads = torch.zeros(self.num_grads, g.numel(), device=g.device)
        self.grads[self.next_row] = g * flat_keep(pl_module, self.names, named)
        self.next_row = (self.next_row + 1) % self.num_grads
        self.filled = min(self.filled + 1, self.num_grads)

    def compute_masks(self, step: int, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        masks = {n: self.mask_set.mask_for(n, params[n]).clone() for n in self.names}
        if self.grads is None or self.filled == 0:
            rank_zero_warn(f"MFACPruning: no gradient was collected before step {step}; pruning by magnitude.")
            return super().compute_masks(step, params)
        grads = self.grads[: self.filled]
        weights = torch.cat([params[n].detach().reshape(-1).double() for n in self.names])
        keep = torch.cat([masks[n].reshape(-1) for n in self.names])
        density, target = keep.double().mean().item(), 1.0 - self.target_at(step)
        if target < density:
            factor = (target / density) ** (1.0 / self.recomputations)
            for r in range(1, self.recomputations + 1):
                sparsity = 1.0 - (target if r == self.recomputations else density * factor**r)
                kept = keep.nonzero().squeeze(1)
                fisher = StaticInverseFisher(grads[:, kept], self.damp, self.block_size)
                diag = fisher.diag()
                scores = torch.full_like(weights, -math.inf)
                scores[kept] = obs_saliency(weights[kept], diag)
                masks = self.select_masks(self._per_layer(scores, params), sparsity, step)
                new_keep = torch.cat([masks[n].reshape(-1) for n in self.names])
                weights[kept] += obs_update(fisher, weights[kept], ~new_keep[kept], diag)
                weights[~new_keep] = 0.0
                keep = new_keep
            with torch.no_grad():
                for n, piece in zip(self.names, split_flat(weights, [params[n] for n in self.names]), strict=True):
                    params[n].copy_(piece)
        if event_after := next_event(step + 1, self.start_step, self.end_step, self.every_steps):
            if event_after - step > self.num_grads:
                self._free()
        else:
            self._free()
        return masks

    def _per_layer(self, flat: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        pieces = split_flat(flat.float(), [params[n] for n in self.names])
        return dict(zip(self.names, pieces, strict=True))

    def _free(self) -> None:
        self.grads, self.filled, self.next_row = None, 0, 0
