"""The multiple-choice knapsack of cost-constrained channel pruning (SMCP, Humble et al. ECCV 2022).

Each group offers options (keep its top j channels), each with a value (the summed importance of those channels) and a
cost; exactly one option is chosen per group so that the total value is largest and the total cost stays within the
budget. Solved exactly by dynamic programming over costs discretized into ``resolution`` units of the budget. Costs
are rounded *up* to whole units, so the chosen options never exceed the real budget; the optimum is exact for the
rounded costs (the reference's ``dp`` solver needs integer costs and takes them as given; its float solver is a
meet-in-the-middle search, exponential in the worst case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def multiple_choice_knapsack(
    values: Sequence[Tensor], costs: Sequence[Tensor], budget: float, resolution: int = 2000
) -> tuple[list[int], float, float]:
    """The option chosen in each group, the total value and the total (real) cost.

    Args:
        values, costs: per group, one value and one non-negative cost per option (1-D, same length).
        budget: the largest allowed total cost.
        resolution: units the budget is divided into for the dynamic programme (time and memory grow linearly).

    Raises ``ValueError`` when even the cheapest options exceed the budget.
    """
    if len(values) != len(costs) or any(
        v.shape != c.shape or v.dim() != 1 or not len(v) for v, c in zip(values, costs, strict=True)
    ):
        raise ValueError("every group needs as many values as costs, and at least one option")
    if any(bool((c < 0).any()) for c in costs):
        raise ValueError("option costs must be non-negative")
    cheapest = sum(float(c.min()) for c in costs)
    if cheapest > budget * (1 + 1e-12):
        raise ValueError(f"the cheapest options cost {cheapest:.6g}, more than the budget {budget:.6g}")
    unit = budget / resolution if budget > 0 else 1.0
    capacity = resolution if budget > 0 else 0
    units = [torch.ceil(c.double() / unit - 1e-9).clamp(min=0).long() for c in costs]
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # best[u]: largest value using at most u units
    choices = []
    for value, unit_cost in zip(values, units, strict=True):
        value = value.double()
        layer = torch.full((len(value), capacity + 1), -math.inf, dtype=torch.float64)
        for option, (v, u) in enumerate(zip(value.tolist(), unit_cost.tolist(), strict=True)):
            if u <= capacity:
                layer[option, u:] = best[: capacity + 1 - u] + v
        best, choice = layer.max(0)
        choices.append(choice)
    if not math.isfinite(float(best[capacity])):
        raise ValueError(
            "no choice of options fits the budget once costs are rounded up to whole units; raise resolution"
        )
    picked = [0] * len(values)
    u = capacity
    for g in range(len(values) - 1, -1, -1):
        option = int(choices[g][u])
        picked[g] = option
        u -= int(units[g][option])
    total_value = sum(float(values[g][o]) for g, o in enumerate(picked))
    total_cost = sum(float(costs[g][o]) for g, o in enumerate(picked))
    return picked, total_value, total_cost
