"""Hard-concrete gates and the dual update of constrained L0 sparsity.

Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization" (ICLR 2018): a gate
z = min(1, max(0, s (zeta - gamma) + gamma)), s = sigmoid((log u - log(1 - u) + log alpha) / beta), u ~ U(0, 1), with
gamma = -0.1, zeta = 1.1, beta = 2/3 (the constants of Gallego-Posada et al., "Controlled Sparsity via Constrained
Optimization", NeurIPS 2022). P(z != 0) = 1 - sigmoid(beta log(-gamma / zeta) - log alpha) is differentiable in
log alpha, so the expected density of a layer is its mean; at evaluation the gate is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
_EPS = 1e-6


def init_log_alpha(shape: torch.Size, droprate: float, generator: torch.Generator | None = None) -> Tensor:
    """log alpha = log((1 - p0) / p0) + N(0, 0.01^2), p0 = ``droprate`` (the reference's initialization)."""
    noise = torch.randn(shape, generator=generator) * 0.01
    return math.log((1 - droprate) / droprate) + noise


def gate_noise(
    shape: torch.Size, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """u ~ U(0, 1) for one sample of each gate, kept away from 0 and 1."""
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp(_EPS, 1 - _EPS)


def hard_concrete(log_alpha: Tensor, noise: Tensor) -> Tensor:
    """The gate z for noise u (differentiable in ``log_alpha``)."""
    s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def sample_gates(log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One hard-concrete sample per gate (differentiable in ``log_alpha``)."""
    return hard_concrete(log_alpha, gate_noise(log_alpha.shape, generator, log_alpha.device, log_alpha.dtype))


def gate_probability(log_alpha: Tensor) -> Tensor:
    """P(z != 0) = 1 - sigmoid(beta log(-gamma / zeta) - log alpha), differentiable in ``log_alpha``."""
    return 1 - torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)


def eval_gates(log_alpha: Tensor) -> Tensor:
    """The deterministic gate at evaluation: clip(sigmoid(log alpha / beta) (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha / BETA) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def dual_step(multiplier: float, violation: float, lr: float, restart: bool) -> float:
    """Projected gradient ascent on a multiplier, lambda <- max(0, lambda + lr (density - target)); with
    ``restart`` (dual restarts, the reference's default) lambda is reset to 0 while the constraint holds."""
    if restart and violation <= 0:
        return 0.0
    return max(0.0, multiplier + lr * violation)
