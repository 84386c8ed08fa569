"""The Hessian's spectral radius and its gradient (Sandler, Klabjan & Luo, arXiv 2102.11210), and its Kronecker-factored
estimate (Martens & Grosse 2015).

rho(H) comes from power iteration on Hessian-vector products (one double backward each), with the vector
arithmetic in float64; the Rayleigh quotient v^T H v of the converged unit vector is the dominant eigenvalue lambda
and rho = |lambda|. Its gradient is d rho / d theta = sign(lambda) v^T (dH/d theta) v, the gradient of v^T H v with
v held fixed: one more backward through the Hessian-vector product (third order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SpectralEstimate:
    """The dominant eigenvalue ``eigenvalue`` (rho = its absolute value), its unit eigenvector ``vector`` (one tensor
    per parameter), whether the iteration ``converged`` and after how many ``iterations``."""

    eigenvalue: float
    vector: list[Tensor]
    converged: bool
    iterations: int

    @property
    def rho(self) -> float:
        return abs(self.eigenvalue)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def hessian_vector_product(
    grads: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor], create_graph: bool = False
) -> list[Tensor]:
    """H v for ``grads`` = d loss / d ``params`` taken with ``create_graph=True``."""
    products = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True, create_graph=create_graph)
    return list(products)


def spectral_radius(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    start: Sequence[Tensor] | None = None,
    tolerance: float = 1e-3,
    max_iterations: int = 1000,
    generator: torch.Generator | None = None,
) -> SpectralEstimate:
    """Power iteration on H from ``start`` (the previous eigenvector: a warm start) or a random unit vector; stops
    when the Rayleigh quotient changes by at most ``tolerance`` relative (Sandler's code: 1e-3, cap 1000)."""
    if start is None:
        start = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in params]
    norm = torch.sqrt(_dot(start, start))
    vector = [(v.double() / norm).to(p.dtype) for v, p in zip(start, params, strict=True)]
    eigenvalue = 0.0
    for iteration in range(1, max_iterations + 1):
        product = hessian_vector_product(grads, params, vector)
        new = float(_dot(vector, product))
        length = float(torch.sqrt(_dot(product, product)))
        if length == 0.0:
            return SpectralEstimate(0.0, vector, True, iteration)
        vector = [(h.double() / length).to(p.dtype) for h, p in zip(product, params, strict=True)]
        if iteration > 1 and abs(new - eigenvalue) <= tolerance * abs(eigenvalue):
            return SpectralEstimate(new, vector, True, iteration)
        eigenvalue = new
    return SpectralEstimate(eigenvalue, vector, False, max_iterations)


def spectral_radius_gradient(
    grads: Sequence[Tensor], params: Sequence[Tensor], estimate: SpectralEstimate
) -> list[Tensor]:
    """d rho / d theta = sign(lambda) grad_theta (v^T H v), v fixed (third-order autograd)."""
    vector = [v.detach() for v in estimate.vector]
    product = hessian_vector_product(grads, params, vector, create_graph=True)
    quadratic = sum((v * h).sum() for v, h in zip(vector, product, strict=True))
    gradient = torch.autograd.grad(quadratic, params, retain_graph=True, allow_unused=True)
    sign = 1.0 if estimate.eigenvalue >= 0 else -1.0
    return [sign * g if g is not None else torch.zeros_like(p) for g, p in zip(gradient, params, strict=True)]


def kronecker_radius(inputs: Tensor, output_grads: Tensor) -> float:
    """rho(A (x) G) = rho(A) rho(G) for one layer's Kronecker factors A = E[a a^T] (its inputs, a column of ones
    appended for the bias) and G = E[g g^T] (the loss gradients at its outputs), over the rows of ``inputs`` and
    ``output_grads`` (samples x features). Both factors are symmetric positive semi-definite."""
    a = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1).double()
    g = output_grads.double()
    factor_a = a.T @ a / a.shape[0]
    factor_g = g.T @ g / g.shape[0]
    return float(torch.linalg.eigvalsh(factor_a)[-1] * torch.linalg.eigvalsh(factor_g)[-1])
