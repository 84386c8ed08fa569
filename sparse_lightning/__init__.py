"""sparse-lightning: training-time sparsity for PyTorch Lightning."""

from sparse_lightning.callbacks import (
    SET,
    SNIP,
    ConstantMask,
    GaP,
    GradualMagnitudePruning,
    MFACPreconditioner,
    MFACPruning,
    RigL,
    SparsityCallback,
    SparsityMonitor,
    StaticRandomMask,
)
from sparse_lightning.core.masks import masks_of
from sparse_lightning.recipes import load_recipe

__version__ = "0.1.0"

__all__ = [
    "ConstantMask",
    "GaP",
    "GradualMagnitudePruning",
    "MFACPreconditioner",
    "MFACPruning",
    "RigL",
    "SET",
    "SNIP",
    "SparsityCallback",
    "SparsityMonitor",
    "StaticRandomMask",
    "load_recipe",
    "masks_of",
]
