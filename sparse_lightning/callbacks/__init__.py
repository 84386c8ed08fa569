"""Lightning callbacks, one file per method, all on :class:`~sparse_lightning.callbacks.base.SparsityCallback`."""

from sparse_lightning.callbacks.acdc import ACDC
from sparse_lightning.callbacks.base import SparsityCallback
from sparse_lightning.callbacks.channels import ChannelPruning
from sparse_lightning.callbacks.dst import SET, RigL, StaticRandomMask
from sparse_lightning.callbacks.earlycrop import EarlyCroP
from sparse_lightning.callbacks.gap import GaP
from sparse_lightning.callbacks.gradual import ConstantMask, GradualMagnitudePruning
from sparse_lightning.callbacks.l0 import ControlledSparsity
from sparse_lightning.callbacks.mfac import MFACPreconditioner, MFACPruning
from sparse_lightning.callbacks.monitor import SparsityMonitor
from sparse_lightning.callbacks.optimizer import LearningRateFunction, SetWeightDecay
from sparse_lightning.callbacks.registry import METHODS, register
from sparse_lightning.callbacks.smcp import SoftMaskChannelPruning
from sparse_lightning.callbacks.snip import SNIP
from sparse_lightning.callbacks.spectral import SpectralHessianRegularization

__all__ = [
    "ACDC",
    "METHODS",
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
    "SET",
    "SNIP",
    "SetWeightDecay",
    "SoftMaskChannelPruning",
    "SparsityCallback",
    "SparsityMonitor",
    "SpectralHessianRegularization",
    "StaticRandomMask",
    "register",
]
