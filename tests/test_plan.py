"""Every method describes itself as data (``plan``), the package's core stays plain torch, constructors take
keyword arguments."""

import subprocess
import sys

import pytest
from helpers import TinyNet

from sparse_lightning import (
    SET,
    SNIP,
    ConstantMask,
    GaP,
    GradualMagnitudePruning,
    MFACPreconditioner,
    MFACPruning,
    RigL,
    StaticRandomMask,
)
from sparse_lightning.callbacks import METHODS
from sparse_lightning.core.plan import Event, Timeline

TIMELINE = Timeline(total_steps=100, steps_per_epoch=10)
WEIGHTS = {"conv.weight": (8, 1, 3), "fc1.weight": (32, 112), "fc2.weight": (4, 32)}


def test_importing_the_core_does_not_import_lightning():
    code = (
        "import sys, sparse_lightning.core, sparse_lightning.core.plan, sparse_lightning.mfac; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("callback", "events"),
    [
        (
            GradualMagnitudePruning(sparsity=0.8, start=10, end=0.5, every=20),
            [Event(10, "prune", 0.0), Event(30, "prune", 0.8 * (1 - 0.5**3)), Event(50, "prune", 0.8)],
        ),
        (RigL(sparsity=0.9, start=0, end=0.75, every=25), [Event(s, "drop/grow", 0.9) for s in (0, 25, 50)]),
        (SET(sparsity=0.9, end="5ep", every="2ep"), [Event(s, "drop/grow", 0.9) for s in (0, 20, 40)]),
        (SNIP(sparsity=0.7, batches=3), [Event(2, "prune", 0.7)]),
        (
            GaP(sparsity=0.5, parts=2, phase="2ep", cycles=1, start=5),
            [Event(5, "grow", 0.5), Event(25, "prune/grow", 0.5), Event(45, "prune", 0.5)],
        ),
        (StaticRandomMask(sparsity=0.6), []),
        (ConstantMask(), []),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, list) else "",
)
def test_plan_lists_parameters_and_events(callback, events):
    plan = callback.plan(TinyNet(), TIMELINE)
    assert plan.method == type(callback).__name__
    assert plan.parameters == WEIGHTS
    assert [e.step for e in plan.events] == [e.step for e in events]
    assert [e.kind for e in plan.events] == [e.kind for e in events]
    assert [e.target for e in plan.events] == pytest.approx([e.target for e in events])
    assert plan.target == getattr(callback, "sparsity", None)


def test_plans_carry_the_memory_of_m_fac():
    pruning = MFACPruning(sparsity=0.5, start=0, end=40, every=20, num_grads=8, block_size=None)
    assert pruning.plan(TinyNet(), TIMELINE).memory_bytes == 4 * 8 * (24 + 3584 + 128)
    preconditioner = MFACPreconditioner(num_grads=16).plan(TinyNet(), TIMELINE)
    dim = sum(p.numel() for p in TinyNet().parameters())
    assert preconditioner.memory_bytes == 4 * 16 * dim + 2 * 16 * 16 * 8
    assert preconditioner.target is None and preconditioner.events == []


def test_a_plan_raises_what_training_raises():
    with pytest.raises(ValueError, match=r"`end`=200 is optimizer step 200, but training has only 100 steps"):
        GradualMagnitudePruning(end=200).plan(TinyNet(), TIMELINE)
    with pytest.raises(ValueError, match=r"`include` pattern 'head.\*' selects no parameter"):
        RigL(include=["head.*"]).plan(TinyNet(), TIMELINE)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_the_sparsity_is_positional(name):
    cls = METHODS[name]
    with pytest.raises(TypeError, match="positional argument"):
        cls(0.5, 0.1) if name != "constant_mask" else cls(["fc1.weight"])
