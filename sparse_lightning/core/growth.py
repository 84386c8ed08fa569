"""Drop and grow: the mask update shared by dynamic sparse training methods (RigL, SET).

Given a layer's mask, its weights and a grow score, :func:`drop_and_grow` removes the ``count`` active weights of
smallest ``|w| (+ noise)`` and activates the ``count`` connections with the largest grow score among those not kept
after the drop (a connection dropped and grown back in the same update keeps its value). Ties go to the lower
index, as ``top_k`` does in the RigL reference.
"""

from __future__ import annotations

import math

from torch import Tensor

from sparse_lightning.core.distribution import smallest


def cosine_drop_fraction(step: int, end: int, alpha: float) -> float:
    """RigL's f(t) = alpha / 2 * (1 + cos(pi * t / end)), 0 after ``end`` (Evci et al. 2020, eq. 1)."""
    if step > end:
        return 0.0
    if end <= 0:
        return alpha
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


def drop_and_grow(
    mask: Tensor, weight: Tensor, grow_score: Tensor, count: int, drop_noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The new mask and the grown connections that were inactive before (they start at zero)."""
    flat_mask = mask.flatten()
    drop_score = weight.detach().abs().flatten().float()
    if drop_noise is not None:
        drop_score = drop_score + drop_noise.flatten().to(drop_score)
    drop_score = drop_score.masked_fill(~flat_mask, math.inf)
    after_drop = flat_mask & ~smallest(drop_score, count)
    grow = (-grow_score.detach().abs().flatten().float().to(flat_mask.device)).masked_fill(after_drop, math.inf)
    grown = smallest(grow, count)
    new_mask = after_drop | grown
    return new_mask.view_as(mask), (grown & ~flat_mask).view_as(mask)
