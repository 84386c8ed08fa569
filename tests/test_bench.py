import csv
from pathlib import Path

import pytest
from wandb_records import history

from sparse_lightning.cli import main

RECIPES = Path(__file__).parents[1] / "recipes"


def test_bench_on_a_tiny_setting_writes_the_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept text\n")
    args = [
        "bench",
        "--recipes",
        str(RECIPES / "gmp-90-global.yaml"),
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--limit-train-batches",
        "5",
        "--out-dir",
        str(tmp_path / "out"),
        "--docs",
        str(doc),
        "--wandb",
    ]
    assert main(args) == 0
    import wandb

    wandb.teardown()  # the W&B service writes the run file to its end before it stops
    with open(tmp_path / "out" / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["dense", "ModelPruning 90%", "gmp-90-global"] * 2
    by_name = {r["name"]: r for r in rows if r["seed"] == "0"}
    assert float(by_name["dense"]["achieved"]) == 0.0
    for row in rows:  # each run's median step over the dense run's of the same seed, timed in this process
        dense = next(r for r in rows if r["name"] == "dense" and r["seed"] == row["seed"])
        assert float(row["median_step_s"]) > 0
        assert float(row["step_ratio"]) == pytest.approx(float(row["median_step_s"]) / float(dense["median_step_s"]))
    for name in ("ModelPruning 90%", "gmp-90-global"):
        assert float(by_name[name]["achieved"]) == pytest.approx(0.9, abs=1e-3)
        assert 0.1 < float(by_name[name]["flops_ratio"]) < 0.3
        assert int(by_name[name]["nonzero_param_bytes"]) < int(by_name["dense"]["nonzero_param_bytes"]) / 4
    text = doc.read_text()
    assert "kept text" in text and "<!-- bench:start -->" in text and "| gmp-90-global | 90% |" in text
    assert "sparse-lightning bench --recipes" in text
    assert "![test accuracy against achieved sparsity](out/bench.png)" in text  # relative to the doc
    png = (tmp_path / "out" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    (row,) = [r for r in history(run_file) if "bench/accuracy_vs_sparsity/_type" in r]
    assert row["bench/accuracy_vs_sparsity/_type"] == "image-file"
    assert row["bench/runs/_type"] == "table-file" and row["bench/runs/nrows"] == 6


def test_bench_rejects_bad_input(capsys):
    assert main(["bench", "--recipes", str(RECIPES / "gmp-90.yaml"), "--seeds", "0"]) == 2
    assert "--seeds and --epochs must be at least 1" in capsys.readouterr().err
