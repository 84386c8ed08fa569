"""CroP's gradient-flow saliency (Rachwan et al., "Winning the Lottery Ahead of Time", ICML 2022).

The gradient norm's sensitivity to each weight: with g_bar = sum_b grad L_b over B batches (held constant), the
Hessian-gradient product H g_bar is accumulated as grad_theta z_b, z_b = sum (g_bar * grad L_b * mask), one double
backward per batch, and the saliency of a weight is |theta * H g_bar| (GraSP, Wang et al. 2020, uses the signed
-theta * H g; CroP's absolute value keeps the weights that most change the gradient flow, in either direction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


def iterative_targets(sparsity: float, steps: int) -> list[float]:
    """EarlyCroP's sparsities within one pruning event: s_i = L - (L - b) 0.5^i for i = 0 .. ``steps``, then L, with
    b = 0.5 (b = 0.25 when L <= 0.5); increasing, ending exactly at L. For L <= 0.25 the reference's first step
    exceeds L (and its loop then stops there); here the one step is L."""
    base = 0.5 if sparsity > 0.5 else 0.25
    if sparsity <= base:  # the reference would start above the target and end there; prune once instead
        return [sparsity]
    return [sparsity - (sparsity - base) * 0.5**i for i in range(steps + 1)] + [sparsity]


def settled(distances: Sequence[float], factor: float) -> bool:
    """EarlyCroP's trigger after the latest of ``distances`` (d_1, d_2, ...): |d_t - d_{t-1}| < tau with
    tau = d_1 x ``factor`` and d_0 = 0 (the reference's starting value, so the first distance never fires)."""
    if not distances:
        return False
    previous = distances[-2] if len(distances) > 1 else 0.0
    return abs(distances[-1] - previous) < distances[0] * factor


def hessian_gradient_product(
    loss: Callable[[int], Tensor],
    batches: int,
    params: Sequence[Tensor],
    masks: Sequence[Tensor | None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    gates: Sequence[Tensor] = (),
) -> tuple[list[Tensor], list[Tensor]]:
    """(g_bar, H g_bar) for ``params``: ``loss(b)`` computes batch b's loss (a fresh forward each call).

    g_bar is the sum of the batches' gradients and H g_bar the sum over batches of grad_theta z_b, z_b = sum
    (g_bar * grad L_b * mask) (the mask zeroes masked entries of g_bar's direction, as in the reference). ``gates``
    (tensors the forward multiplies outputs by, at 1) get dz/dgate appended to the product: EarlyCroP-S's channel
    saliency. ``reduce`` (e.g. a sum over ranks) is applied to g_bar before the second pass and to the result, so
    every rank holds the product over all ranks' batches.
    """
    params = list(params)
    g_bar = [torch.zeros_like(p) for p in params]
    for b in range(batches):
        for total, grad in zip(g_bar, torch.autograd.grad(loss(b), params, allow_unused=True), strict=True):
            if grad is not None:
                total += grad.detach()
    if reduce is not None:
        g_bar = [reduce(g) for g in g_bar]
    directions = [g if m is None else g * m for g, m in zip(g_bar, masks or [None] * len(params), strict=True)]
    targets = [*params, *gates]
    product = [torch.zeros_like(t) for t in targets]
    for b in range(batches):
        grads = torch.autograd.grad(loss(b), params, create_graph=True)
        z = sum((d * g).sum() for d, g in zip(directions, grads, strict=True))
        for total, part in zip(product, torch.autograd.grad(z, targets, allow_unused=True), strict=True):
            if part is not None:
                total += part.detach()
    if reduce is not None:
        product = [reduce(h) for h in product]
    return g_bar, product


def crop_scores(params: Mapping[str, Tensor], hg: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CroP's saliency |theta * H g_bar| of every weight."""
    return {n: (params[n].detach() * hg[n]).abs() for n in hg}
