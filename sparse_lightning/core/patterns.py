"""Under which pattern weights are removed.

A pattern splits a weight into *units* that are pruned as a whole, each scored by the mean of its elements' scores:

- ``unstructured``: every element is a unit.
- ``"N:M"``: N kept in every M consecutive weights along the input dimension (``weight[o, i, *k]`` is grouped
  along ``i`` for each ``(o, *k)``, as the 2:4 sparse tensor cores expect). A unit is one group of M; pruning it
  removes its M - N smallest-scored elements. Sparsity therefore grows gradually from dense to ``1 - N/M`` as
  more groups become N:M sparse, and can not exceed ``1 - N/M``.
- ``"block:RxC"``: blocks of R outputs by C consecutive inputs, along the input dimension as N:M groups
  (``weight[o, i, *k]`` for each kernel position ``k``): a Linear weight's R x C tiles; in a convolution, C
  consecutive input channels at one kernel position, as SparseML's ``block4`` (``[1, 4]``) and channels-last block
  kernels group them.
- ``channel``: whole output channels (rows ``weight[o]``); at least one channel is always kept.

Elements whose score is ``-inf`` (already pruned) make their unit score ``-inf``, so units that were pruned stay
pruned.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lightning.core.errors import ConfigError, ConfigTypeError

PATTERN_FORMS = "'unstructured', 'channel', 'N:M' (e.g. '2:4', N < M) or 'block:RxC' (e.g. 'block:4x1')"


@dataclass(frozen=True)
class Pattern:
    kind: str
    n: int = 1
    m: int = 1

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.n}x{self.m}"
        return self.kind

    @property
    def max_sparsity(self) -> float:
        """The highest sparsity the pattern allows, before per-layer limits."""
        return 1.0 - self.n / self.m if self.kind == "nm" else 1.0

    def check_sparsity(self, sparsity: float) -> None:
        """Raise ``ValueError`` when ``sparsity`` is more than the pattern allows (N:M: 1 - N/M)."""
        if sparsity > self.max_sparsity + 1e-12:
            raise ConfigError(
                f"`sparsity` {sparsity} is more than pattern {self} allows (at most {self.max_sparsity})."
            )

    def check(self, name: str, shape: torch.Size) -> None:
        """Raise ``ValueError`` naming the parameter when its shape can not carry this pattern."""
        if self.kind == "unstructured":
            return
        if len(shape) < 2 and self.kind != "channel":
            raise ConfigError(f"Parameter {name!r} of shape {tuple(shape)} has no input dimension for pattern {self}.")
        if self.kind == "nm" and shape[1] % self.m:
            raise ConfigError(
                f"Parameter {name!r} of shape {tuple(shape)} is too small for pattern {self}: its input dimension "
                f"{shape[1]} is not a multiple of M={self.m}. Exclude it or choose another pattern."
            )
        if self.kind == "block" and (shape[0] % self.n or shape[1] % self.m):
            raise ConfigError(
                f"Parameter {name!r} of shape {tuple(shape)} does not divide into blocks of {self.n} outputs x "
                f"{self.m} inputs (its output and input dimensions are {shape[0]} and {shape[1]}). Exclude it or "
                "choose another pattern."
            )

    def num_units(self, shape: torch.Size) -> int:
        numel = math.prod(shape)
        if self.kind == "unstructured":
            return numel
        if self.kind == "channel":
            return shape[0]
        if self.kind == "nm":
            return numel // self.m
        return numel // (self.n * self.m)

    def removed_per_unit(self, shape: torch.Size) -> int:
        """Elements one pruned unit removes."""
        if self.kind == "unstructured":
            return 1
        if self.kind == "channel":
            return math.prod(shape[1:])
        if self.kind == "nm":
            return self.m - self.n
        return self.n * self.m

    def max_pruned_units(self, shape: torch.Size) -> int:
        return self.num_units(shape) - 1 if self.kind == "channel" else self.num_units(shape)

    def unit_scores(self, score: Tensor) -> Tensor:
        """One score per unit (1-D, in unit order); higher means more worth keeping."""
        score = score.detach()
        if self.kind == "unstructured":
            return score.flatten()
        if self.kind == "channel":
            return score.flatten(1).mean(dim=1)
        if self.kind == "nm":
            groups = self._groups(score)
            smallest = groups.sort(dim=-1).values[..., : self.m - self.n]
            return smallest.mean(dim=-1).flatten()
        return self._blocks(score).mean(dim=(-2, -1)).flatten()

    def keep_mask(self, score: Tensor, pruned_units: Tensor) -> Tensor:
        """The keep mask (bool, shape of ``score``) when the units flagged in ``pruned_units`` are pruned."""
        if self.kind == "unstructured":
            return ~pruned_units.view(score.shape)
        if self.kind == "channel":
            return (~pruned_units).view(-1, *([1] * (score.dim() - 1))).expand(score.shape).clone()
        if self.kind == "nm":
            groups = self._groups(score.detach())
            keep = torch.ones_like(groups, dtype=torch.bool)
            order = groups.argsort(dim=-1, stable=True)[..., : self.m - self.n]
            drop = torch.zeros_like(keep).scatter_(-1, order, True)
            keep = ~(drop & pruned_units.view(groups.shape[:-1]).unsqueeze(-1))
            return self._ungroup(keep, score.shape)
        outs, inputs = score.shape[0], score.shape[1]
        positions = score[0, 0].numel()
        block_keep = (~pruned_units).view(outs // self.n, 1, positions, inputs // self.m, 1)
        keep = block_keep.expand(outs // self.n, self.n, positions, inputs // self.m, self.m)
        return self._ungroup(keep.reshape(outs, positions, inputs), score.shape)

    def _groups(self, t: Tensor) -> Tensor:
        moved = t.movedim(1, -1) if t.dim() > 2 else t
        return moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.m, self.m)

    def _ungroup(self, groups: Tensor, shape: torch.Size) -> Tensor:
        if len(shape) > 2:
            moved_shape = (shape[0], *shape[2:], shape[1])
            return groups.reshape(moved_shape).movedim(-1, 1).contiguous()
        return groups.reshape(shape)

    def _blocks(self, t: Tensor) -> Tensor:
        """(out blocks, kernel positions, input blocks, R, C), in unit order."""
        outs, inputs = t.shape[0], t.shape[1]
        moved = (t.movedim(1, -1) if t.dim() > 2 else t).reshape(outs, -1, inputs)
        blocks = moved.reshape(outs // self.n, self.n, moved.shape[1], inputs // self.m, self.m)
        return blocks.permute(0, 2, 3, 1, 4)


_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse ``unstructured``, ``channel``, ``"N:M"`` or ``"block:RxC"``; ``ValueError`` names what is allowed."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ConfigTypeError(f"`pattern` must be a string, one of {PATTERN_FORMS}; got {pattern!r}.")
    text = pattern.strip().lower()
    if text in ("unstructured", "channel"):
        return Pattern(text)
    if match := _NM.match(text):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(
                f"`pattern` {pattern!r} is not a valid N:M pattern: need 0 < N < M. Allowed: {PATTERN_FORMS}."
            )
        return Pattern("nm", n, m)
    if match := _BLOCK.match(text):
        r, c = int(match.group(1)), int(match.group(2))
        if r < 1 or c < 1 or r * c < 2:
            raise ConfigError(f"`pattern` {pattern!r} needs blocks of at least 2 elements. Allowed: {PATTERN_FORMS}.")
        return Pattern("block", r, c)
    raise ConfigError(f"Unknown `pattern` {pattern!r}. Allowed: {PATTERN_FORMS}.")
