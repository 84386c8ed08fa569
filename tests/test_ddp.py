import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, flop_seconds

SCRIPT = Path(__file__).parent / "ddp_train.py"


def run_ranks(tmp_path: Path, variant: str) -> subprocess.CompletedProcess:
    """Two gloo ranks of ``ddp_train.py`` with ``variant``; each saves what it ended with under ``tmp_path``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), variant], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "distribution",
    ["global", "erk", "rigl", "set", "gap", "mfac_preconditioner", "mfac_pruning", "earlycrop", "spectral", "acdc"],
)
def test_ddp_ranks_hold_identical_masks_and_reach_target(tmp_path, distribution):
    result = run_ranks(tmp_path, distribution)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 24  # 64 samples / 2 ranks / batch 4 = 8 steps, 3 epochs
    for (step_a, fp_a), (step_b, fp_b) in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert step_a == step_b and torch.equal(fp_a, fp_b), f"masks differ after step {step_a}"
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    kept = sum(int(m.sum()) for m in ranks[0]["masks"].values())
    total = sum(m.numel() for m in ranks[0]["masks"].values())
    assert total - kept == round(0.9 * total)
    params = ranks[0]["weights"]
    zeros = sum(int((params[n] == 0).sum()) for n in ranks[0]["masks"])
    assert zeros >= round(0.9 * total)

    state_a, state_b = ranks[0]["callback_state"], ranks[1]["callback_state"]
    for key in ("fisher", "grads"):
        if key in state_a:  # the M-FAC windows, built from the averaged gradients, agree exactly
            a, b = state_a[key], state_b[key]
            for k in a if isinstance(a, dict) else [None]:
                x, y = (a[k], b[k]) if k is not None else (a, b)
                assert (x is None and y is None) or torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (key, k)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            "diverge_masks",
            "DivergentMasks at step 4: the ranks computed different masks (rank 0 and rank 1 differ in fc1.weight)",
        ),
        (
            "diverge_weights",
            "DivergentWeights at step 1: the ranks computed different weights (rank 0 and rank 1 differ in fc2.weight)",
        ),
    ],
)
def test_ranks_that_compute_different_masks_or_weights_are_reported(tmp_path, variant, message):
    """The check runs on what each rank computed, before anything is applied: a rank that diverges on purpose is
    named, with the method and the parameter, on every rank."""
    result = run_ranks(tmp_path, variant)
    assert result.returncode != 0
    assert result.stderr.count(message) >= 2, result.stderr[-3000:]  # raised on both ranks


@pytest.mark.parametrize("variant", ["channels", "smcp", "smcp_latency", "earlycrop_s", "spectral_neurons"])
def test_ddp_ranks_hold_identical_channel_masks(tmp_path, variant):
    """ChannelPruning with Taylor scores and SMCP with Taylor importance (both read the averaged gradients); SMCP
    under a latency budget with timers that differ between ranks: every rank solves with rank 0's table; neuron
    pruning on Kronecker-factored saliencies (each rank's factors from its own batches, averaged at each event)
    under the K-FAC spectral penalty."""
    result = run_ranks(tmp_path, variant)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for (step_a, fp_a), (step_b, fp_b) in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert step_a == step_b and torch.equal(fp_a, fp_b), f"masks differ after step {step_a}"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    keeps = ranks[0]["callback_state"]["keeps"]
    assert all(torch.equal(k, ranks[1]["callback_state"]["keeps"][n]) for n, k in keeps.items())
    assert 0 < sum(int(k.sum()) for k in keeps.values()) < 40
    if variant == "smcp_latency":
        tables = [r["callback_state"]["latency"] for r in ranks]
        assert tables[0] == tables[1]
        model = TinyNet()
        x = torch.zeros(2, 16)
        assert tables[0]["total"] == pytest.approx(flop_seconds(lambda: model(x), None, 1))  # rank 0's timer
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert not ranks[0]["weights"][name][~mask].any(), name


@pytest.mark.parametrize("variant", ["l0", "l0_structured"])
def test_ddp_ranks_hold_identical_l0_gates_multipliers_and_purged_masks(tmp_path, variant):
    """ControlledSparsity, per weight and per channel: each rank samples its own batch; the gates' gradients are
    averaged over ranks, so gates, multipliers, weights and the purged masks agree exactly."""
    result = run_ranks(tmp_path, variant)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    states = [r["callback_state"] for r in ranks]
    assert states[0]["multipliers"] == states[1]["multipliers"]
    for name, gate in states[0]["gates"].items():
        assert torch.equal(gate, states[1]["gates"][name]), name
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    assert states[0]["multipliers"]["model"] > 0  # the constraint is still pulling after 24 steps
    assert max(float(g.abs().max()) for g in states[0]["gates"].values()) > 0.1  # the gates moved from ~0
    if variant == "l0_structured":
        assert set(states[0]["gates"]) == {"conv", "fc1"}
        assert all(torch.equal(k, states[1]["keeps"][g]) for g, k in states[0]["keeps"].items())
