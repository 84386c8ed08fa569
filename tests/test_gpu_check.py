"""The GPU check script runs end to end on the CPU at small sizes, so it works the first time a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_script_runs_quick_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--quick", "--device", "cpu"]
    result = subprocess.run([*cmd, "--rounds", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["amp"]["pruned"]["nonzero_masked_after_steps"] == 0
    assert results["amp"]["pruned"]["final_scale"] < 65536.0  # the scaler backed off: steps were skipped
    assert results["mfac"]["repeated"]["exact"] and not results["mfac"]["distinct"]["exact"]
    assert max(results["mfac"]["precision"].values()) < 1e-3
    assert "## GPU checks" in (tmp_path / "gpu_check.md").read_text()
