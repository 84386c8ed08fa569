"""The Hessian's spectral radius and its gradient (Sandler, Klabjan & Luo, arXiv 2102.11210), its Kronecker-factored
estimate (Martens & Grosse 2015), and a neuron's Kronecker-factored saliency (Ebrahimi & Klabjan, arXiv 2111.08577).

rho(H) comes from power iteration on Hessian-vector products (one double backward each), with the vector
arithmetic in float64; the Rayleigh quotient v^T H v of the converged unit vector is the dominant eigenvalue lambda
and rho = |lambda|. Its gradient is d rho / d theta = sign(lambda) v^T (dH/d theta) v, the gradient of v^T H v with
v held fixed: one more backward through the Hessian-vector product (third order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def layer_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """The rows a_t a Linear or Conv1d/Conv2d layer multiplies by its weight: ``(samples x locations, fan-in)``,
    one row per sample and output location (a convolution's input patches, Grosse & Martens 2016)."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        two_d = isinstance(layer, nn.Conv2d)
        x = inputs if two_d else inputs.unsqueeze(2)

        def pair(value: Any, fill: int) -> tuple[int, ...]:
            return tuple(value) if two_d else (fill, value[0])

        kernel, stride, dilation = pair(layer.kernel_size, 1), pair(layer.stride, 1), pair(layer.dilation, 1)
        if layer.padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x, padding = F.pad(x, pads), (0, 0)
        else:
            padding = (0, 0) if layer.padding == "valid" else pair(layer.padding, 0)
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise TypeError(f"Kronecker factors are defined for Linear and Conv1d/Conv2d layers, not {type(layer).__name__}.")


def output_rows(layer: nn.Module, outputs: Tensor) -> Tensor:
    """A layer's outputs (or their gradients) as ``(samples x locations, channels)`` rows, matching
    :func:`layer_rows`."""
    if isinstance(layer, nn.Linear):
        return outputs.reshape(-1, outputs.shape[-1])
    return outputs.movedim(1, -1).reshape(-1, outputs.shape[1])


def kronecker_factors(rows: Tensor, grad_rows: Tensor, samples: int, bias: bool) -> tuple[Tensor, Tensor]:
    """K-FAC's factors of one layer (Martens & Grosse 2015; convolutions as KFC, Grosse & Martens 2016):
    A = E_i[sum_t a_it a_it^T] (a column of ones appended when the layer has a bias) and
    G = E_i[(1/T) sum_t g_it g_it^T], with g_it = ``samples`` x the gradient of the batch-mean loss at the output
    (the per-sample loss's gradient), over ``samples`` samples and T locations each. The Fisher block of the layer's
    weight is approximately A (x) G. Differentiable (float64)."""
    a = rows.double()
    if bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
    g = grad_rows.double() * samples
    locations = g.shape[0] / samples
    return a.T @ a / samples, g.T @ g / (samples * locations)


def top_eigenvector(factor: Tensor) -> Tensor:
    """The unit eigenvector of a symmetric matrix's largest eigenvalue (detached)."""
    return torch.linalg.eigh(factor.detach())[1][:, -1]


def kronecker_radius(factor_a: Tensor, factor_g: Tensor) -> Tensor:
    """rho(A (x) G) = rho(A) rho(G) for positive semi-definite A and G, as u^T A u w^T G w with u, w their top
    eigenvectors held fixed: the value is exact and its gradient is the eigenvalues' (Hellmann-Feynman, for simple
    top eigenvalues)."""
    u, w = top_eigenvector(factor_a), top_eigenvector(factor_g)
    return (u @ factor_a @ u) * (w @ factor_g @ w)


def neuron_saliency(output_squares: Tensor, grad_squares: Tensor) -> Tensor:
    """OBD's 1/2 delta^T (A (x) G) delta for removing output neuron j (delta = its weight row and bias, the rest 0):
    1/2 G_jj w~_j^T A w~_j, where w~_j^T A w~_j = E_i[sum_t s_itj^2] (the neuron's squared pre-activation outputs,
    ``output_squares``) and G_jj = E_i[(1/T) sum_t g_itj^2] (``grad_squares``); no factor is formed."""
    return 0.5 * output_squares.double() * grad_squares.double()
