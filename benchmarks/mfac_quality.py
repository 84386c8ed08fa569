"""Optimizer quality on MNIST-1D: SGD, Adam and M-FAC-preconditioned SGD at equal epochs (paper CNN).

    python benchmarks/mfac_quality.py [--seeds 3] [--epochs 100] [--workers 2]

Each run trains the paper's CNN (25 channels) on the 4000 MNIST-1D training samples, batch 100, and records the
mean training loss of every epoch and the final test accuracy. Learning rates: SGD 0.1 with momentum 0.9, Adam 1e-2
(the task's default), M-FAC: ``MFACPreconditioner`` (128 gradients, the CPU default, damp 1e-5) before SGD with
momentum 0.9 at the learning rate given by ``--mfac-lr``; all annealed by ``--schedule`` (cosine by default). One
torch thread per run.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("sgd", "adam", "mfac-sgd")


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER

    from sparse_lightning import MFACPreconditioner
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    method = config["method"]
    optimizer = "adam" if method == "adam" else "sgd"
    model = MNIST1DCNN(lr=config["lr"], optimizer=optimizer, lr_schedule=config["schedule"])
    losses: list[float] = []

    class EpochLoss(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.batch_losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batch_losses.append(float(outputs["loss"]))

        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(sum(self.batch_losses) / len(self.batch_losses))

    callbacks = [EpochLoss()]
    if method == "mfac-sgd":
        callbacks.insert(0, MFACPreconditioner(num_grads=128, damp=1e-5))
    trainer = pl.Trainer(
        max_epochs=config["epochs"],
        **QUIET_TRAINER,
        check_val_every_n_epoch=10**6,
        callbacks=callbacks,
    )
    data = MNIST1DDataModule(batch_size=100, val_fraction=0.0)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return {**config, "test_acc": 100 * acc, "losses": " ".join(f"{v:.5f}" for v in losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--mfac-lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"], help="learning-rate schedule")
    parser.add_argument("--no-write", action="store_true", help="print only (for learning-rate sweeps)")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/benchmarks.md from the CSVs")
    args = parser.parse_args()
    if args.report_only:
        write_report()
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    lrs = {"sgd": args.sgd_lr, "adam": 1e-2, "mfac-sgd": args.mfac_lr}
    todo = [
        {"method": m, "seed": s, "epochs": args.epochs, "lr": lrs[m], "schedule": args.schedule}
        for s in range(args.seeds)
        for m in args.methods
    ]
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(run, todo):
            rows.append(result)
            last = result["losses"].split()[-1]
            print(
                f"{result['method']} lr={result['lr']} seed={result['seed']}: acc {result['test_acc']:.1f}, "
                f"final train loss {last}",
                flush=True,
            )
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"mfac_quality_{args.schedule}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "epochs", "lr", "schedule", "test_acc", "losses"])
        writer.writeheader()
        writer.writerows(rows)
    write_report()


def write_report() -> None:
    """One table per learning-rate schedule found in ``benchmarks/results/mfac_quality_*.csv``."""
    from _report import mean_spread, table, write_section

    body = [
        "## M-FAC as an optimizer on MNIST-1D",
        "",
        "`python benchmarks/mfac_quality.py --seeds 3 --epochs 100 --mfac-lr 0.001 --schedule {cosine,constant}` "
        "(paper CNN, batch 100, 1 torch thread a run; raw rows with the per-epoch training loss in "
        "`benchmarks/results/mfac_quality_<schedule>.csv`). Test accuracy in %, mean ± standard deviation over "
        "seeds; training loss (mean over the epoch's batches, averaged over seeds) after the given epochs. SGD and "
        "M-FAC-SGD use momentum 0.9; M-FAC: `MFACPreconditioner(num_grads=128, damp=1e-5)`.",
    ]
    for path in sorted(RESULTS.glob("mfac_quality_*.csv")):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        epochs = int(rows[0]["epochs"])
        marks = sorted({1, epochs // 10, epochs // 4, epochs // 2, epochs})
        out = []
        for method in METHODS:
            runs = [r for r in rows if r["method"] == method]
            if not runs:
                continue
            curves = [[float(v) for v in r["losses"].split()] for r in runs]
            loss_at = [f"{statistics.mean(c[e - 1] for c in curves):.3f}" for e in marks]
            accs = [float(r["test_acc"]) for r in runs]
            out.append([f"{method} (lr {runs[0]['lr']})", f"{mean_spread(accs)} (n={len(runs)})", *loss_at])
        body += [
            "",
            f"### {rows[0]['schedule']} learning rate, {epochs} epochs",
            "",
            table(["optimizer", "test accuracy", *[f"loss @ ep {e}" for e in marks]], out),
        ]
    write_section("mfac-quality", "\n".join(body))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
