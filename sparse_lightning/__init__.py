"""sparse-lightning: training-time sparsity for PyTorch Lightning.

The callbacks are imported on first use, so ``import sparse_lightning.core`` (plain torch) does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ACDC": "sparse_lightning.callbacks",
    "ChannelPruning": "sparse_lightning.callbacks",
    "ConstantMask": "sparse_lightning.callbacks",
    "ControlledSparsity": "sparse_lightning.callbacks",
    "EarlyCroP": "sparse_lightning.callbacks",
    "GaP": "sparse_lightning.callbacks",
    "GradualMagnitudePruning": "sparse_lightning.callbacks",
    "LearningRateFunction": "sparse_lightning.callbacks",
    "MFACPreconditioner": "sparse_lightning.callbacks",
    "MFACPruning": "sparse_lightning.callbacks",
    "RigL": "sparse_lightning.callbacks",
    "SET": "sparse_lightning.callbacks",
    "SNIP": "sparse_lightning.callbacks",
    "SetWeightDecay": "sparse_lightning.callbacks",
    "SoftMaskChannelPruning": "sparse_lightning.callbacks",
    "SparsityCallback": "sparse_lightning.callbacks",
    "SparsityMonitor": "sparse_lightning.callbacks",
    "SpectralHessianRegularization": "sparse_lightning.callbacks",
    "StaticRandomMask": "sparse_lightning.callbacks",
    "compact": "sparse_lightning.structure",
    "load_recipe": "sparse_lightning.recipes",
    "masks_of": "sparse_lightning.core.masks",
}

__all__ = [
    "ACDC",
    "SET",
    "SNIP",
    "ChannelPruning",
    "ConstantMask",
    "ControlledSparsity",
    "EarlyCroP",
    "GaP",
    "GradualMagnitudePruning",
    "LearningRateFunction",
    "MFACPreconditioner",
    "MFACPruning",
    "RigL",
    "SetWeightDecay",
    "SoftMaskChannelPruning",
    "SparsityCallback",
    "SparsityMonitor",
    "SpectralHessianRegularization",
    "StaticRandomMask",
    "compact",
    "load_recipe",
    "masks_of",
]

if TYPE_CHECKING:
    from sparse_lightning.callbacks import (
        ACDC,
        SET,
        SNIP,
        ChannelPruning,
        ConstantMask,
        ControlledSparsity,
        EarlyCroP,
        GaP,
        GradualMagnitudePruning,
        LearningRateFunction,
        MFACPreconditioner,
        MFACPruning,
        RigL,
        SetWeightDecay,
        SoftMaskChannelPruning,
        SparsityCallback,
        SparsityMonitor,
        SpectralHessianRegularization,
        StaticRandomMask,
    )
    from sparse_lightning.core.masks import masks_of
    from sparse_lightning.recipes import load_recipe
    from sparse_lightning.structure import compact


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
