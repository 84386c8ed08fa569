"""Channel criteria and which channels go under a cost target (plain torch).

Criteria, per channel of a group (float64):

- ``l1``: Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for Efficient ConvNets" (ICLR 2017): the filter's
  sum of absolute kernel weights, summed over the group's producers (every layer whose output rows the group holds).
- ``l2``: the filter's L2 norm over the same weights.
- ``taylor``: Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for Neural Network Pruning" (CVPR 2019),
  eq. (8) on a gate after each normalization layer: (dL/dz)^2 = (sum_c gamma * dL/dgamma + beta * dL/dbeta)^2 per
  channel and norm layer, summed over the group's norm layers; without a norm, the same on each producer's output,
  (sum w * dL/dw + b * dL/db)^2. Averaged over the steps between pruning events, as the paper averages over
  mini-batches. The reference code's BN variant (method 22) squares gamma and beta terms separately; this is the
  gate's own importance, which the paper defines.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor

from sparse_lightning.structure.groups import ChannelCost, ChannelGroup, keep_counts, member_sums

CRITERIA = ("l1", "l2", "taylor")
RANKINGS = ("global", "uniform")


def magnitude_scores(group: ChannelGroup, params: Mapping[str, Tensor], norm: str) -> Tensor:
    """``l1`` or ``l2`` norm of each channel's producer weights."""
    if norm == "l1":
        return sum(
            (member_sums(m, params[m.param].abs(), group.channels) for m in group.role("producer")),
            torch.zeros(group.channels, dtype=torch.float64),
        )
    squares = sum(
        (member_sums(m, params[m.param].square(), group.channels) for m in group.role("producer")),
        torch.zeros(group.channels, dtype=torch.float64),
    )
    return squares.sqrt()


def taylor_scores(group: ChannelGroup, params: Mapping[str, Tensor]) -> Tensor:
    """One step's gate importance (dL/dz)^2 per channel, from the current gradients (module docstring)."""
    norms = group.role("norm_weight", "norm_bias")
    members = norms or group.role("producer", "bias")
    layers: dict[str, Tensor] = {}
    for m in members:
        p = params[m.param]
        if p.grad is None:
            continue
        layer = m.param.rsplit(".", 1)[0]
        gate = member_sums(m, p.detach() * p.grad, group.channels)
        layers[layer] = layers[layer] + gate if layer in layers else gate
    return sum((g.square() for g in layers.values()), torch.zeros(group.channels, dtype=torch.float64))


def normalized(scores: Tensor, keep: Tensor) -> Tensor:
    """Scores divided by the mean over the group's kept channels, so groups of different width and fan-in rank on
    one scale (a group whose kept scores are all zero keeps zeros)."""
    mean = scores[keep].mean() if bool(keep.any()) else scores.new_tensor(0.0)
    return scores / mean if float(mean) > 0 else scores


def _chunks(keep: Tensor, scores: Tensor, round_to: int) -> list[Tensor]:
    """The group's next removals, lowest scores first, each bringing the kept count to the next allowed count."""
    kept = int(keep.sum())
    order = keep.nonzero().flatten()
    order = order[torch.argsort(scores[order], stable=True)]
    allowed = [k for k in keep_counts(len(keep), round_to) if k < kept]
    chunks, done = [], 0
    for k in allowed:
        chunks.append(order[done : kept - k])
        done = kept - k
    return chunks


def select_channels(
    groups: list[ChannelGroup],
    scores: Mapping[str, Tensor],
    keeps: Mapping[str, Tensor],
    cost: ChannelCost,
    target: float,
    round_to: int = 1,
    ranking: str = "global",
    normalize: bool = True,
) -> dict[str, Tensor]:
    """New channel masks that remove at least ``target`` of the cost, dropped channels staying dropped.

    ``global``: chunks of channels (``round_to`` at a time, lowest score first within a group) leave in order of
    their mean score, each group's scores :func:`normalized` unless ``normalize`` is False, until the cost target
    is met. ``uniform``: every group keeps the same
    fraction of its channels (the smallest fraction meeting the target, found by bisection). ``cost`` is updated.
    """
    keeps = {g.name: keeps[g.name].clone() for g in groups}
    if cost.removed_fraction() >= target - 1e-12:
        return keeps
    if ranking == "uniform":
        return _uniform(groups, scores, keeps, cost, target, round_to)
    candidates = []
    for gi, g in enumerate(groups):
        norm = normalized(scores[g.name], keeps[g.name]) if normalize else scores[g.name]
        for ci, chunk in enumerate(_chunks(keeps[g.name], norm, round_to)):
            candidates.append((float(norm[chunk].mean()), ci, gi, chunk))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    for _, _, gi, chunk in candidates:
        if cost.removed_fraction() >= target - 1e-12:
            break
        name = groups[gi].name
        cost.drop(name, chunk)
        keeps[name][chunk] = False
    return keeps


def _uniform(
    groups: list[ChannelGroup],
    scores: Mapping[str, Tensor],
    keeps: dict[str, Tensor],
    cost: ChannelCost,
    target: float,
    round_to: int,
) -> dict[str, Tensor]:
    def attempt(fraction: float) -> tuple[dict[str, Tensor], ChannelCost]:
        trial_cost, trial = copy.deepcopy(cost), {n: k.clone() for n, k in keeps.items()}
        for g in groups:
            want = g.channels * (1.0 - fraction)
            allowed = [k for k in keep_counts(g.channels, round_to) if k >= want - 1e-9] or [g.channels]
            kept_now = int(trial[g.name].sum())
            drop = kept_now - min(min(allowed), kept_now)
            if drop > 0:
                chunk = torch.cat(_chunks(trial[g.name], scores[g.name], 1)[:drop])
                trial_cost.drop(g.name, chunk)
                trial[g.name][chunk] = False
        return trial, trial_cost

    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if attempt(mid)[1].removed_fraction() >= target - 1e-12:
            high = mid
        else:
            low = mid
    result, final = attempt(high)
    cost.__dict__.update(final.__dict__)
    return result


def max_removable(groups: list[ChannelGroup], cost: ChannelCost, round_to: int) -> float:
    """The largest cost fraction that keeping the smallest allowed count in every group removes."""
    trial = copy.deepcopy(cost)
    for g in groups:
        smallest = keep_counts(g.channels, round_to)[-1]
        if smallest < g.channels:
            trial.drop(g.name, torch.arange(smallest, g.channels))
    return trial.removed_fraction()
