import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, tiny_loader
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb_records import history

from sparse_lightning import GradualMagnitudePruning, SparsityMonitor


def test_wandb_offline_run_records_sparsity_table_and_histograms(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.manual_seed(0)
    logger = WandbLogger(project="sparse-lightning-tests", save_dir=str(tmp_path), offline=True)
    pruning = GradualMagnitudePruning(sparsity=0.8, start=4, end=12, every=4)
    settings = {**QUIET, "logger": logger}
    pl.Trainer(max_epochs=2, log_every_n_steps=1, callbacks=[pruning], **settings).fit(TinyNet(), tiny_loader())
    import wandb

    wandb.finish()
    wandb.teardown()  # the W&B service writes the run file to its end before it stops
    (run_file,) = Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    values = [(row["trainer/global_step"], row["sparsity/global"]) for row in rows if "sparsity/global" in row]
    assert len(values) == 16
    # events at steps 4 (s_i = 0), 8 (0.8 * (1 - 0.5^3) = 0.7) and 12 (0.8); every earlier value is 0.0
    assert [v for s, v in values if s < 8] == [0.0] * 8, "0.0 before pruning starts must reach W&B"
    assert values[8][1] == pytest.approx(0.7, abs=1e-3)
    assert values[-1][1] == pytest.approx(0.8, abs=1e-3)
    targets = [row["sparsity/target"] for row in rows if "sparsity/target" in row]
    assert targets[0] == 0.0 and targets[-1] == pytest.approx(0.8)
    assert any("sparsity/fc1.weight" in row for row in rows)
    tables = [row for row in rows if "sparsity/layers/_type" in row]
    assert len(tables) == 4  # pruning events at steps 4, 8, 12 and the end of fit
    assert all(t["sparsity/layers/_type"] == "table-file" and t["sparsity/layers/nrows"] == 3 for t in tables)
    (table_file,) = run_file.parent.glob("files/" + tables[-1]["sparsity/layers/path"])
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["parameter", "shape", "numel", "nonzero", "sparsity", "target"]
    by_name = {row[0]: row for row in table["data"]}
    assert by_name["fc1.weight"][4] == pytest.approx(0.8, abs=1e-3)
    hists = [row for row in rows if row.get("weights/fc1.weight/_type") == "histogram"]
    assert len(hists) == 4


def test_metrics_reach_any_lightning_logger(tmp_path):
    logger = CSVLogger(tmp_path)
    pruning = GradualMagnitudePruning(sparsity=0.5, start=2, end=6, every=2, log_sparsity=False)
    settings = {**QUIET, "logger": logger}
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=1, callbacks=[pruning, SparsityMonitor()], **settings)
    trainer.fit(TinyNet(), tiny_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["sparsity/global"]) for r in rows if r.get("sparsity/global")]
    assert logged[0] == 0.0 and logged[-1] == pytest.approx(0.5, abs=1e-3)
    assert "sparsity/conv.weight" in rows[0]
    assert "sparsity/global" in trainer.progress_bar_metrics


def test_two_methods_log_one_global_sparsity_over_every_mask(tmp_path, monkeypatch):
    """fc1 at 0.5 and fc2 at 0.8 by two callbacks: one writer logs the sparsity over both (the last callback used
    to win with its own layer's 0.8) and the target weighted by the values each selects."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.manual_seed(0)
    logger = WandbLogger(project="sparse-lightning-tests", save_dir=str(tmp_path), offline=True)
    callbacks = [
        GradualMagnitudePruning(sparsity=0.5, include=["fc1.weight"], start=2, end=4, every=1),
        GradualMagnitudePruning(sparsity=0.8, include=["fc2.weight"], start=2, end=4, every=1),
    ]
    settings = {**QUIET, "logger": logger}
    model = TinyNet()
    pl.Trainer(max_epochs=1, log_every_n_steps=1, callbacks=callbacks, **settings).fit(model, tiny_loader())
    import wandb

    wandb.finish()
    wandb.teardown()  # the W&B service writes the run file to its end before it stops
    fc1, fc2 = model.fc1.weight, model.fc2.weight
    true_global = (int((fc1 == 0).sum()) + int((fc2 == 0).sum())) / (fc1.numel() + fc2.numel())
    assert true_global == (1792 + 102) / 3712  # 0.8 of fc2's 128 weights rounds to 102
    (run_file,) = Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    logged = [row for row in rows if "sparsity/global" in row]
    assert len(logged) == 8  # one writer: one row per step, not one per callback
    assert logged[-1]["sparsity/global"] == pytest.approx(true_global, abs=1e-6)
    assert logged[-1]["sparsity/target"] == pytest.approx((0.5 * 3584 + 0.8 * 128) / 3712)
    assert logged[-1]["sparsity/fc2.weight"] == 102 / 128
    tables = [row for row in rows if "sparsity/layers/_type" in row]
    (table_file,) = run_file.parent.glob("files/" + tables[-1]["sparsity/layers/path"])
    table = json.loads(table_file.read_text())
    targets = {row[0]: row[5] for row in table["data"]}
    assert targets == {"fc1.weight": 0.5, "fc2.weight": 102 / 128}


def test_sparsity_reaches_the_logger_and_progress_bar_between_logging_steps(tmp_path):
    """log_every_n_steps=50 on a 16-step run: Lightning would log nothing. The first step and every mask update
    still reach the logger, and the progress bar shows the sparsity from the first step on."""
    shown = []

    class ProgressBarProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            shown.append(trainer.progress_bar_metrics.get("sparsity/global"))

    logger = CSVLogger(tmp_path)
    pruning = GradualMagnitudePruning(sparsity=0.5, start=3, end=9, every=3)
    settings = {**QUIET, "logger": logger, "enable_progress_bar": True}
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=50, callbacks=[pruning, ProgressBarProbe()], **settings)
    trainer.fit(TinyNet(), tiny_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsity/global")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 9]
    assert float(rows[0]["sparsity/global"]) == 0.0 and float(rows[-1]["sparsity/global"]) == pytest.approx(0.5, 1e-3)
    assert len(shown) == 16 and None not in shown
    assert shown[0] == 0.0 and shown[-1] == pytest.approx(0.5, abs=1e-3)
