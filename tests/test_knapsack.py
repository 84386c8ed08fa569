"""The multiple-choice knapsack of SMCP against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparse_lightning.structure.knapsack import multiple_choice_knapsack


def brute_force(values, costs, budget):
    best, best_pick = -float("inf"), None
    for pick in itertools.product(*(range(len(v)) for v in values)):
        cost = sum(float(costs[g][o]) for g, o in enumerate(pick))
        value = sum(float(values[g][o]) for g, o in enumerate(pick))
        if cost <= budget + 1e-9 and value > best:
            best, best_pick = value, pick
    return best, best_pick


@pytest.mark.parametrize("seed", range(20))
def test_integer_costs_reach_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    groups = int(torch.randint(2, 6, (1,), generator=g))
    values = [torch.rand(int(torch.randint(1, 6, (1,), generator=g)), generator=g) for _ in range(groups)]
    costs = [torch.randint(0, 20, v.shape, generator=g).double() for v in values]
    budget = int(sum(float(c.min()) for c in costs)) + int(torch.randint(0, 30, (1,), generator=g))
    picked, value, cost = multiple_choice_knapsack(values, costs, budget, resolution=max(budget, 1))
    best, _ = brute_force(values, costs, budget)
    assert value == pytest.approx(best) and cost <= budget
    assert value == pytest.approx(sum(float(values[i][o]) for i, o in enumerate(picked)))


@pytest.mark.parametrize("seed", range(20))
def test_real_costs_never_exceed_the_budget_and_come_close_to_the_optimum(seed):
    g = torch.Generator().manual_seed(100 + seed)
    values = [torch.rand(5, generator=g).sort(descending=True).values.cumsum(0) for _ in range(4)]
    costs = [torch.rand(5, generator=g).cumsum(0) for _ in range(4)]
    budget = 0.6 * sum(float(c.max()) for c in costs)
    picked, value, cost = multiple_choice_knapsack(values, costs, budget, resolution=2000)
    best, _ = brute_force(values, costs, budget)
    assert cost <= budget and value <= best + 1e-9
    tight, _ = brute_force(values, costs, budget * (1 - 4 / 2000))  # rounding loses at most a unit per group
    assert value >= tight - 1e-9


def test_an_impossible_budget_is_refused():
    with pytest.raises(ValueError, match="the cheapest options cost 3, more than the budget 2"):
        multiple_choice_knapsack(
            [torch.ones(2), torch.ones(2)], [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])], 2
        )
