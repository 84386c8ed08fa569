"""Plain-torch building blocks: which parameters, how many to keep, under which pattern, and the mask set.

Nothing in this package imports Lightning; callbacks in :mod:`sparse_lightning.callbacks` decide *when*.
"""

from sparse_lightning.core.distribution import DISTRIBUTIONS, er_densities, erk_densities, round_unit_counts
from sparse_lightning.core.masks import MaskSet, masks_of
from sparse_lightning.core.patterns import Pattern, parse_pattern
from sparse_lightning.core.plan import Event, MethodPlan, Timeline
from sparse_lightning.core.schedules import CURVES, TimeSpec, parse_time, sparsity_at
from sparse_lightning.core.targets import default_targets, match_name, select_parameters

__all__ = [
    "CURVES",
    "DISTRIBUTIONS",
    "Event",
    "MaskSet",
    "MethodPlan",
    "Pattern",
    "TimeSpec",
    "Timeline",
    "round_unit_counts",
    "default_targets",
    "er_densities",
    "erk_densities",
    "masks_of",
    "match_name",
    "parse_pattern",
    "parse_time",
    "select_parameters",
    "sparsity_at",
]
