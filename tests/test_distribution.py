import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_lightning.core.distribution import (
    er_densities,
    erk_densities,
    layer_densities,
    pruned_units,
    round_unit_counts,
    smallest,
)
from sparse_lightning.core.patterns import parse_pattern
from sparse_lightning.core.schedules import sparsity_at

SHAPES = {"a": torch.Size([20, 10]), "b": torch.Size([10, 10, 3, 3]), "c": torch.Size([4, 40])}


def test_erk_against_hand_computation():
    # ERK factors sum(shape)/prod(shape): a 30/200, b 26/900, c 44/160; weights 200 + 900 + 160 = 1260.
    # At 50% sparsity 630 are kept = eps * (30 + 26 + 44) -> eps = 6.3; c would get 1.73 > 1, so c is dense
    # and eps is re-solved on a, b: 470 = 56 eps -> eps = 8.39; now a would get 1.26 > 1, so a is dense too,
    # and b keeps the rest: 630 - 200 - 160 = 270 of 900 -> density 0.3.
    dens = erk_densities(SHAPES, 0.5)
    assert dens["a"] == pytest.approx(1.0) and dens["c"] == pytest.approx(1.0)
    assert dens["b"] == pytest.approx(0.3, rel=1e-9)
    # At 90% no layer saturates: 126 kept = 100 eps.
    dens = erk_densities(SHAPES, 0.9)
    assert dens == pytest.approx({"a": 1.26 * 30 / 200, "b": 1.26 * 26 / 900, "c": 1.26 * 44 / 160}, rel=1e-9)


def test_er_ignores_kernel_dimensions():
    dens = er_densities(SHAPES, 0.9)
    ratio = dens["b"] / dens["a"]
    assert ratio == pytest.approx(((10 + 10) / 100) / ((20 + 10) / 200))


def test_uniform_with_override_and_min_density():
    dens = layer_densities(SHAPES, 0.5, "uniform", fixed={"c": 1.0})
    assert dens["c"] == 1.0 and dens["a"] == pytest.approx(dens["b"])
    assert dens["a"] * 200 + dens["b"] * 900 + 160 == pytest.approx(630)
    dens = layer_densities(SHAPES, 0.95, "erk", min_density=0.04)
    assert min(dens.values()) >= 0.04 - 1e-12


def test_unreachable_targets_raise():
    with pytest.raises(ValueError, match="can not reach sparsity"):
        layer_densities(SHAPES, 0.9, "uniform", fixed={"b": 1.0})
    with pytest.raises(ValueError, match="can not reach sparsity"):
        layer_densities(SHAPES, 0.1, "uniform", fixed={"a": 0.0, "b": 0.0})


def test_largest_remainder_hits_total_exactly():
    counts = round_unit_counts({"a": 2.5, "b": 3.5, "c": 1.0}, 7, dict.fromkeys("abc", 1), dict.fromkeys("abc", 10))
    assert sum(counts.values()) == 7


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.99])
def test_realised_sparsity_is_exact(distribution, sparsity):
    torch.manual_seed(0)
    scores = {k: torch.rand(s) for k, s in SHAPES.items()}
    pattern = parse_pattern("unstructured")
    pruned = pruned_units(scores, pattern, sparsity, distribution)
    removed = sum(int(p.sum()) for p in pruned.values())
    assert removed == round(sparsity * 1260)


def test_global_ranks_all_layers_together():
    scores = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "y": torch.tensor([0.5, 5.0])}
    pruned = pruned_units(scores, parse_pattern("unstructured"), 0.5, "global")
    assert pruned["x"].tolist() == [True, True, False, False]
    assert pruned["y"].tolist() == [True, False]


def test_already_pruned_entries_stay_pruned():
    score = torch.tensor([[-math.inf, 0.1, 5.0, 6.0]])
    pruned = pruned_units({"w": score}, parse_pattern("unstructured"), 0.25, "uniform")
    assert pruned["w"].tolist() == [True, False, False, False]


@given(
    values=st.lists(st.integers(-3, 3).map(float) | st.just(-math.inf), min_size=1, max_size=60),
    fraction=st.floats(0, 1),
)
def test_smallest_equals_a_stable_sort(values, fraction):
    tensor = torch.tensor(values)
    k = round(fraction * len(values))
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[tensor.argsort(stable=True)[:k]] = True
    assert torch.equal(smallest(tensor, k), expected)


def test_rounding_respects_units_already_pruned():
    # a layer that already lost 3 units keeps them; the others give up the difference
    counts = round_unit_counts(
        {"a": 2.4, "b": 2.4, "c": 2.2}, 7, dict.fromkeys("abc", 1), dict.fromkeys("abc", 9), {"a": 3, "b": 0, "c": 0}
    )
    assert counts["a"] == 3 and sum(counts.values()) == 7


CNN = {
    "c1": torch.Size([25, 1, 5]),
    "c2": torch.Size([25, 25, 3]),
    "c3": torch.Size([25, 25, 3]),
    "fc": torch.Size([10, 125]),
}


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("final", [0.8, 0.9, 0.95])
def test_a_gradual_schedule_ends_on_the_exact_count(distribution, final):
    """Every event of a cubic schedule on the MNIST-1D CNN hits round(s * N) exactly, pruned units staying pruned."""
    torch.manual_seed(0)
    masks = {k: torch.ones(s, dtype=torch.bool) for k, s in CNN.items()}
    total = sum(m.numel() for m in masks.values())
    pattern = parse_pattern("unstructured")
    for step in range(0, 101, 1):
        sparsity = sparsity_at(step, 0, 100, 0.0, final, "cubic")
        scores = {k: torch.randn(s).abs().masked_fill(~masks[k], -math.inf) for k, s in CNN.items()}
        pruned = pruned_units(scores, pattern, sparsity, distribution)
        for k in masks:
            new = ~pruned[k].view(CNN[k])
            assert not (new & ~masks[k]).any()
            masks[k] = new
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total), step
