"""How many weights each layer keeps, and which units a score removes.

- ``uniform``: every layer at the target sparsity.
- ``er`` (Mocanu et al. 2018): density proportional to (n_in + n_out) / (n_in * n_out); kernels ignored.
- ``erk`` (Evci et al. 2020, "Rigging the Lottery", Sec. 3): density proportional to
  sum(shape) / prod(shape), kernel dimensions included.
- ``global``: one threshold on the scores of all selected layers.

For ``er``/``erk`` the scale eps is solved so that the kept weights add up to the target; a layer whose density
would exceed 1 is made dense and eps is solved again over the rest, as in the RigL reference. Here the re-solve is
done exactly by bisection on eps with every layer's density clipped to [min_density, max], which also honours
per-layer overrides and the minimum density. Counts are rounded with the largest-remainder rule so the realised
total equals the target to the element (unstructured) or to the unit (structured patterns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.patterns import Pattern

DISTRIBUTIONS = ("uniform", "er", "erk", "global")


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"`distribution` must be one of {list(DISTRIBUTIONS)}, got {distribution!r}.")
    return distribution


def er_factor(shape: torch.Size) -> float:
    n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
    return (n_in + n_out) / (n_in * n_out)


def erk_factor(shape: torch.Size) -> float:
    return sum(shape) / math.prod(shape)


def _solve_densities(
    numels: Mapping[str, int],
    factors: Mapping[str, float],
    kept: float,
    low: Mapping[str, float],
    high: Mapping[str, float],
    distribution: str,
) -> dict[str, float]:
    """Densities d_l = clip(eps * f_l, low_l, high_l) with sum_l n_l d_l = kept, eps by bisection."""

    def total(eps: float) -> float:
        return sum(n * min(high[k], max(low[k], eps * factors[k])) for k, n in numels.items())

    floor_total, ceil_total = total(0.0), sum(n * high[k] for k, n in numels.items())
    n_all = sum(numels.values())
    if kept < floor_total - 0.5:
        raise ConfigError(
            f"`distribution` {distribution!r} can not reach sparsity {1 - kept / n_all:.4f}: the minimum "
            f"density and overrides already keep {floor_total / n_all:.4f} of the weights."
        )
    if kept > ceil_total + 0.5:
        raise ConfigError(
            f"`distribution` {distribution!r} can not reach sparsity {1 - kept / n_all:.4f}: even with every "
            f"free layer dense only {ceil_total / n_all:.4f} of the weights are kept (check the overrides)."
        )
    lo, hi = 0.0, 1.0
    while total(hi) < kept and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < kept else (lo, mid)
    return {k: min(high[k], max(low[k], hi * factors[k])) for k in numels}


def layer_densities(
    shapes: Mapping[str, torch.Size],
    sparsity: float,
    distribution: str,
    fixed: Mapping[str, float] | None = None,
    min_density: float = 0.0,
    floor: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer densities for ``uniform``, ``er`` or ``erk`` so that the selected weights reach ``sparsity``.

    ``fixed`` maps layer names to a density that is kept as given (per-layer overrides); ``floor`` gives a
    layer's lowest possible density (a 2:4 pattern can not go below 1/2).
    """
    fixed = dict(fixed or {})
    numels = {k: math.prod(s) for k, s in shapes.items()}
    if distribution == "uniform":
        factors = dict.fromkeys(shapes, 1.0)
    elif distribution == "er":
        factors = {k: er_factor(s) for k, s in shapes.items()}
    elif distribution == "erk":
        factors = {k: erk_factor(s) for k, s in shapes.items()}
    else:
        raise ConfigError(f"`layer_densities` serves 'uniform', 'er' and 'erk', not {distribution!r}.")
    low = {k: fixed.get(k, max(min_density, (floor or {}).get(k, 0.0))) for k in shapes}
    high = {k: fixed.get(k, 1.0) for k in shapes}
    kept = (1.0 - sparsity) * sum(numels.values())
    return _solve_densities(numels, factors, kept, low, high, distribution)


def erk_densities(shapes: Mapping[str, torch.Size], sparsity: float) -> dict[str, float]:
    """ERK densities (Evci et al. 2020) reaching ``sparsity`` over the given shapes."""
    return layer_densities(shapes, sparsity, "erk")


def er_densities(shapes: Mapping[str, torch.Size], sparsity: float) -> dict[str, float]:
    """Erdos-Renyi densities (Mocanu et al. 2018) reaching ``sparsity`` over the given shapes."""
    return layer_densities(shapes, sparsity, "er")


def round_unit_counts(
    ideal: Mapping[str, float],
    total: int,
    unit: Mapping[str, int],
    cap: Mapping[str, int],
    floor: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Round ``ideal`` pruned-unit counts so that sum(count * unit) comes as close to ``total`` as units allow.

    Largest-remainder rounding within ``floor <= count <= cap`` (``floor``: units already pruned, which stay
    pruned): floors first, then one more unit to the layers with the largest fractional parts, or one fewer from
    those with the smallest when the floors already overshoot.
    """
    floor = floor or dict.fromkeys(ideal, 0)
    counts = {k: min(cap[k], max(floor[k], math.floor(v))) for k, v in ideal.items()}
    deficit = total - sum(counts[k] * unit[k] for k in counts)
    by_fraction = sorted(ideal, key=lambda k: ideal[k] - math.floor(ideal[k]), reverse=True)
    for k in by_fraction if deficit > 0 else reversed(by_fraction):
        if deficit > 0 and deficit * 2 >= unit[k] and counts[k] < cap[k]:
            counts[k] += 1
            deficit -= unit[k]
        elif deficit < 0 and -deficit * 2 >= unit[k] and counts[k] > floor[k]:
            counts[k] -= 1
            deficit += unit[k]
    return counts


def pruned_units(
    scores: Mapping[str, Tensor],
    pattern: Pattern,
    sparsity: float,
    distribution: str,
    fixed: Mapping[str, float] | None = None,
    min_density: float = 0.0,
) -> dict[str, Tensor]:
    """Which units of each layer to prune so that the layers reach ``sparsity`` overall.

    ``scores`` holds one tensor per layer (higher = keep; ``-inf`` marks entries that are already pruned and must
    stay pruned, so their units go first). Returns a bool tensor per layer over its units (True = pruned).
    """
    fixed = dict(fixed or {})
    shapes = {k: s.shape for k, s in scores.items()}
    unit = {k: pattern.removed_per_unit(s) for k, s in shapes.items()}
    numel = {k: math.prod(s) for k, s in shapes.items()}
    units = {k: pattern.unit_scores(s) for k, s in scores.items()}
    already = {k: int(torch.isneginf(u).sum()) for k, u in units.items()}
    cap = {
        k: min(pattern.max_pruned_units(shapes[k]), math.floor((1.0 - min_density) * numel[k] / unit[k] + 1e-9))
        for k in shapes
    }
    cap = {k: max(cap[k], already[k]) for k in cap}
    nm_floor = {k: 1.0 - pattern.max_sparsity for k in shapes} if pattern.kind == "nm" else None
    total_remove = round(sparsity * sum(numel.values()))
    if distribution != "global":
        dens = layer_densities(shapes, sparsity, distribution, fixed, min_density, nm_floor)
        ideal = {k: (1.0 - dens[k]) * numel[k] / unit[k] for k in shapes}
        counts = round_unit_counts(ideal, total_remove, unit, cap, already)
        return {k: smallest(units[k], counts[k]) for k in units}
    result = {
        k: smallest(units[k], max(min(cap[k], round((1.0 - fixed[k]) * numel[k] / unit[k])), already[k])) for k in fixed
    }
    free = [k for k in shapes if k not in fixed]
    if not free:
        return result
    budget = total_remove - sum(int(result[k].sum()) * unit[k] for k in result)
    if len({unit[k] for k in free}) == 1 and all(cap[k] == units[k].numel() for k in free):
        flat = torch.cat([units[k].float() for k in free])
        chosen = smallest(flat, max(round(budget / unit[free[0]]), sum(already[k] for k in free)))
        result.update(zip(free, chosen.split([units[k].numel() for k in free]), strict=True))
    else:
        counts = _global_counts(
            {k: units[k] for k in free}, {k: unit[k] for k in free}, {k: cap[k] for k in free}, budget
        )
        result.update({k: smallest(units[k], max(counts[k], already[k])) for k in free})
    return result


def random_masks(
    shapes: Mapping[str, torch.Size], sparsity: float, distribution: str, generator: torch.Generator
) -> dict[str, Tensor]:
    """Random keep masks (True = kept) that reach ``sparsity`` exactly under ``distribution``.

    Scores are uniform draws from ``generator`` (on the CPU, in ``shapes`` order), so a seeded generator gives the
    same masks on every rank and after every resume.
    """
    scores = {n: torch.rand(s, generator=generator) for n, s in shapes.items()}
    pruned = pruned_units(scores, Pattern("unstructured"), sparsity, distribution)
    return {n: ~pruned[n].view(shapes[n]) for n in shapes}


def smallest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` smallest entries of a 1-D tensor; ties at the threshold go to the lower index.

    A selection in O(n) (``kthvalue``) rather than a full sort, so a pruning event on millions of weights stays cheap.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = values.kthvalue(k).values
    chosen = values < threshold
    ties = (values == threshold).nonzero().squeeze(1)[: k - int(chosen.sum())]
    chosen[ties] = True
    return chosen


def _global_counts(
    units: Mapping[str, Tensor], unit: Mapping[str, int], cap: Mapping[str, int], budget: int
) -> dict[str, int]:
    """Units to prune per layer under one threshold on unit scores, honouring each layer's cap."""
    if not units:
        return {}
    names = list(units)
    ranked = []
    for i, k in enumerate(names):
        u = units[k].float()
        sorted_scores = u.sort(stable=True).values
        eligible = torch.arange(u.numel(), device=u.device) < cap[k]
        ranked.append((sorted_scores.masked_fill(~eligible, math.inf), torch.full_like(u, i)))
    all_scores = torch.cat([s for s, _ in ranked])
    all_layers = torch.cat([layer for _, layer in ranked]).long()
    sizes = torch.tensor([unit[k] for k in names], dtype=torch.float64, device=all_scores.device)[all_layers]
    order = all_scores.argsort(stable=True)
    removed = sizes[order].cumsum(0)
    take = int((removed <= budget + 0.5 * sizes[order]).sum())
    if take and torch.isinf(all_scores[order[take - 1]]) and all_scores[order[take - 1]] > 0:
        raise ConfigError("`distribution` 'global' can not reach the target sparsity within the per-layer limits.")
    chosen = all_layers[order[:take]]
    counts = torch.bincount(chosen, minlength=len(names)).tolist()
    return dict(zip(names, counts, strict=True))
