"""Channel groups as plain data, channel masks as element masks, and what a channel costs.

A :class:`ChannelGroup` is a set of channels that must go together: a layer's output rows and bias, the norm's
channels after it, every consumer's input columns, all producers of one residual sum, a depthwise convolution's in
and out. Each :class:`Member` says which positions along which dimension of which parameter belong to which channel
(a Linear after a flatten has several input columns per channel). A channel mask (bool per channel, True = kept)
becomes an element mask on every member (:func:`channel_masks`); masking all of them, consumers included, is what
makes the masked model compute exactly what the compacted one computes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Member:
    """Positions ``index`` along dimension ``dim`` of parameter ``param`` belong to the group's ``channel``."""

    param: str
    dim: int
    index: Tensor
    channel: Tensor
    role: str
    """``producer`` (a layer's output rows), ``bias``, ``norm_weight``, ``norm_bias``, ``consumer`` (input
    columns) or ``other`` (for example a PReLU slope)."""


@dataclass
class ChannelGroup:
    """Coupled channels, named after the layer whose output channels root the group."""

    name: str
    channels: int
    members: list[Member] = field(default_factory=list)
    unsupported: str | None = None
    """Why the group can not be pruned (``None`` when it can)."""

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(m.param for m in self.members))

    def role(self, *roles: str) -> list[Member]:
        return [m for m in self.members if m.role in roles]


def member_sums(member: Member, values: Tensor, channels: int) -> Tensor:
    """Per channel, the sum of ``values`` (shaped like the member's parameter) over the member's positions of that
    channel and every other dimension (float64, on the CPU)."""
    moved = values.detach().double().movedim(member.dim, 0)
    per_position = moved.reshape(moved.shape[0], -1).sum(-1).cpu()
    return torch.zeros(channels, dtype=torch.float64).index_add_(0, member.channel, per_position[member.index])


def position_keep(member: Member, keep: Tensor, size: int) -> Tensor:
    """Bool vector along ``member.dim``: False at the positions of dropped channels."""
    result = torch.ones(size, dtype=torch.bool)
    result[member.index] = keep.to(torch.bool)[member.channel]
    return result


def _along(vector: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vector.view(shape)


def channel_masks(
    groups: Iterable[ChannelGroup], keeps: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]
) -> dict[str, Tensor]:
    """Element masks (True = kept) of every member parameter for channel masks ``keeps[group name]``."""
    masks: dict[str, Tensor] = {}
    for group in groups:
        keep = keeps[group.name]
        for m in group.members:
            shape = shapes[m.param]
            vector = _along(position_keep(m, keep, shape[m.dim]), m.dim, len(shape))
            masks[m.param] = masks.get(m.param, torch.ones(shape, dtype=torch.bool)) & vector
    return masks


def channel_keeps(groups: Iterable[ChannelGroup], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Channel masks read back from element masks: a channel is dropped when every position of it on every member
    is masked out entirely (a member without a mask keeps everything)."""
    keeps = {}
    for group in groups:
        dropped = torch.ones(group.channels, dtype=torch.bool)
        for m in group.members:
            mask = masks.get(m.param)
            if mask is None:
                dropped[:] = False
                break
            moved = mask.cpu().movedim(m.dim, 0)
            alive = moved.reshape(moved.shape[0], -1).any(-1)
            dropped[m.channel[alive[m.index]]] = False
        keeps[group.name] = ~dropped
    return keeps


class ChannelCost:
    """Cost of a model under channel masks: ``channels``, ``params`` or ``flops``; fractions refer to ``dense``.

    Under channel masks every member parameter's kept part is a product over its dimensions, so its density is
    prod_d kept_d / size_d. ``params`` weighs each parameter by its size; ``flops`` weighs each layer's weight by the
    layer's counted FLOPs (``torch.utils.flop_counter``: a convolution or matmul costs in proportion to its kept
    weights, depthwise included); FLOPs outside any member layer and parameters outside any group are constant.
    ``channels`` counts the channels of the given groups. :meth:`drop` keeps the cost exact as channels go.
    """

    def __init__(
        self,
        groups: list[ChannelGroup],
        shapes: Mapping[str, torch.Size],
        weights: Mapping[str, float],
        total: float,
        kind: str,
        dense: float | None = None,
    ) -> None:
        self.kind = kind
        self.groups = {g.name: g for g in groups}
        self.shapes = dict(shapes)
        self.kept: dict[tuple[str, int], float] = {}
        for g in groups:
            for m in g.members:
                self.kept[(m.param, m.dim)] = float(self.shapes[m.param][m.dim])
        self.weights = {p: float(w) for p, w in weights.items() if any(k[0] == p for k in self.kept)}
        self.dims = {p: [k[1] for k in self.kept if k[0] == p] for p in self.weights}
        self.constant = total - sum(self.weights.values())
        self.channels_kept = {g.name: g.channels for g in groups}
        self.total = float(sum(self.channels_kept.values())) if kind == "channels" else float(total)
        self.dense = self.total if dense is None else float(dense)
        """The cost of the dense model that fractions refer to (differs from ``total`` once a model is compacted)."""

    def param_cost(self, param: str, kept: Mapping[int, float]) -> float:
        """The cost of ``param`` with ``kept[d]`` positions kept along each of its group dimensions ``d``: its
        weight times its density prod_d kept_d / size_d."""
        return self.weights[param] * math.prod(kept[d] / self.shapes[param][d] for d in self.dims[param])

    def kept_of(self, param: str) -> dict[int, float]:
        return {d: self.kept[(param, d)] for d in self.dims[param]}

    def current(self) -> float:
        if self.kind == "channels":
            return float(sum(self.channels_kept.values()))
        return self.constant + sum(self.param_cost(p, self.kept_of(p)) for p in self.weights)

    def removed_fraction(self) -> float:
        return 1.0 - self.current() / self.dense if self.dense else 0.0

    def channel_cost(self, group: str) -> float:
        """What removing one more channel of ``group`` would remove now (every channel of a group has as many
        positions on each member, so any one stands for all)."""
        if not self.channels_kept[group]:
            return 0.0
        return copy.deepcopy(self).drop(group, torch.tensor([0]))

    def drop(self, group: str, channels: Tensor) -> float:
        """Mark ``channels`` (indices, not yet dropped) of ``group`` dropped; returns the cost they removed."""
        before = self.current()
        g = self.groups[group]
        dropped = torch.zeros(g.channels, dtype=torch.bool)
        dropped[channels] = True
        for m in g.members:
            self.kept[(m.param, m.dim)] -= float(dropped[m.channel].sum())
        self.channels_kept[group] -= len(channels)
        return before - self.current()


def keep_counts(channels: int, round_to: int) -> list[int]:
    """Allowed kept-channel counts of a group, descending: ``channels``, then multiples of ``round_to`` down to the
    smallest positive one (a group of at most ``round_to`` channels is never pruned)."""
    counts = [channels]
    k = (channels - 1) // round_to * round_to
    while k >= round_to:
        counts.append(k)
        k -= round_to
    return counts
