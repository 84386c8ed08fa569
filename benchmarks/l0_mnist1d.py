"""ControlledSparsity on MNIST-1D: expected and purged density and accuracy, against GMP at the same density.

    python benchmarks/l0_mnist1d.py [--seeds 3] [--workers 2] [--epochs 100]

The paper CNN (25 channels) and the MLP (100 hidden units), Adam 1e-2, batch 100, 100 epochs, test accuracy on the
1000 test samples of MNIST-1D, at target densities 0.3 and 0.1 (sparsity 0.7 and 0.9):

- ``l0-model`` / ``l0-layer``: ``ControlledSparsity(sparsity, constraint=...)`` with its defaults (gates' Adam
  1e-2, multipliers 0.1, dual restarts); the gates are purged at the end of ``fit``.
- ``l0-model-ref``: the same with the reference's learning rates (gates 7e-4, multipliers 1e-4), made for ~94k steps.
- ``gmp``: ``GradualMagnitudePruning`` (global, cubic, epochs 10% to 60%, every 40 steps) to the same sparsity.

Reported: the expected density at the end (model-wise, the mean of P(gate open) over all gated weights), the
density after purging (the fraction of weights left non-zero), and the accuracy of the purged model. Each run uses
1 torch thread; ``--workers`` runs go in parallel.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("l0-model", "l0-layer", "l0-model-ref", "gmp")
MODELS = ("cnn", "mlp")
DENSITIES = (0.3, 0.1)


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER

    from sparse_lightning import ControlledSparsity, GradualMagnitudePruning
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN, MNIST1DMLP

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    model = MNIST1DCNN(channels=25) if config["model"] == "cnn" else MNIST1DMLP()
    sparsity, method, epochs = 1 - config["density"], config["method"], config["epochs"]
    if method == "gmp":
        callback = GradualMagnitudePruning(
            sparsity=sparsity, start=f"{round(0.1 * epochs)}ep", end=f"{round(0.6 * epochs)}ep", every=40
        )
    else:
        rates = {"gate_lr": 7e-4, "dual_lr": 1e-4} if method.endswith("-ref") else {}
        callback = ControlledSparsity(sparsity, constraint=method.split("-")[1], seed=config["seed"], **rates)
    callback.log_sparsity = False
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], check_val_every_n_epoch=10**6, **QUIET_TRAINER)
    data = MNIST1DDataModule(batch_size=100, val_fraction=0.0)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    params = dict(model.named_parameters())
    kept = sum(int(params[n].count_nonzero()) for n in callback.names) / sum(params[n].numel() for n in callback.names)
    expected = callback.expected_density() if method != "gmp" else float("nan")
    return {**config, "acc": 100 * acc, "expected_density": expected, "purged_density": kept}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    configs = [
        {"model": model, "density": density, "method": method, "seed": seed, "epochs": args.epochs}
        for model in MODELS
        for density in DENSITIES
        for method in METHODS
        for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, configs))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "l0_mnist1d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    write_doc(results, args)


def write_doc(results: list[dict], args: argparse.Namespace) -> None:
    from _report import mean_spread, table, write_section

    labels = {
        "l0-model": "ControlledSparsity, model-wise",
        "l0-layer": "ControlledSparsity, layer-wise",
        "l0-model-ref": "ControlledSparsity, model-wise, the reference's learning rates",
        "gmp": "GradualMagnitudePruning, global",
    }
    rows = []
    for model in MODELS:
        for density in DENSITIES:
            for method in METHODS:
                runs = [r for r in results if (r["model"], r["density"], r["method"]) == (model, density, method)]
                if not runs:
                    continue
                expected = [r["expected_density"] for r in runs if r["expected_density"] == r["expected_density"]]
                rows.append(
                    [
                        "paper CNN (25)" if model == "cnn" else "MLP (100)",
                        f"{density}",
                        labels[method],
                        mean_spread([r["acc"] for r in runs]),
                        f"{statistics.mean(expected):.3f}" if expected else "-",
                        f"{statistics.mean(r['purged_density'] for r in runs):.3f}",
                    ]
                )
    header = ["model", "target density", "method", "test acc %", "expected density", "density after purge"]
    command = f"python benchmarks/l0_mnist1d.py --seeds {args.seeds} --epochs {args.epochs}"
    write_section(
        "l0-mnist1d",
        "## ControlledSparsity on MNIST-1D\n\n"
        f"Command: `{command}` ({args.seeds} seeds, {args.epochs} epochs, 1 thread each).\n\n" + table(header, rows),
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
