"""SpectralHessianRegularization on MNIST-1D: rho(H) at the end with and without the regularizer, accuracy, and the
cost of a regularized step.

    python benchmarks/spectral_mnist1d.py [--seeds 3] [--epochs 30] [--strength 0.01] [--bound 0]

The paper CNN (25 channels), Adam 1e-2, batch 100, ``--epochs`` epochs, the same seed with and without
``SpectralHessianRegularization(strength, bound, every=1)`` (power iteration, tolerance 1e-3, cap 1000, warm
start). rho is measured at the end on the first 1000 training samples (eval mode, tolerance 1e-6) for the Linear
and Conv weights the regularizer covers. The step cost is the run's wall-clock time per optimizer step over the
plain run's (the two runs of a seed run one after the other, 1 torch thread).
"""

from __future__ import annotations

import argparse
import statistics
import time


def run(seed: int, epochs: int, regularizer: dict | None) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER
    from spectral_pruning import final_rho

    from sparse_lightning import SpectralHessianRegularization
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    model = MNIST1DCNN(channels=25)
    callbacks = [SpectralHessianRegularization(every=1, log=False, **regularizer)] if regularizer else []
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, check_val_every_n_epoch=10**6, **QUIET_TRAINER)
    data = MNIST1DDataModule(batch_size=100, val_fraction=0.0)
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    rho = final_rho(model, data)
    return {"acc": 100 * acc, "rho": rho, "step_seconds": seconds / trainer.global_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--strength", type=float, default=0.01)
    parser.add_argument("--bound", type=float, default=0.0)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        plain = run(seed, args.epochs, None)
        regular = run(seed, args.epochs, {"strength": args.strength, "bound": args.bound})
        rows.append((plain, regular))
        print(seed, plain, regular, flush=True)
    write_doc(rows, args)


def write_doc(rows: list, args: argparse.Namespace) -> None:
    from _report import mean_spread, table, write_section

    body = [
        [
            label,
            mean_spread([r[i]["acc"] for r in rows]),
            " / ".join(f"{r[i]['rho']:.2f}" for r in rows),
            f"{statistics.median(r[i]['step_seconds'] for r in rows) * 1e3:.1f}",
            f"{statistics.median(r[i]['step_seconds'] / r[0]['step_seconds'] for r in rows):.1f}",
        ]
        for i, label in ((0, "plain"), (1, f"regularized (mu {args.strength:g}, K {args.bound:g}, every step)"))
    ]
    header = ["run", "test acc %", "rho(H) at the end (per seed)", "ms per step (median)", "step cost vs plain"]
    command = (
        f"python benchmarks/spectral_mnist1d.py --seeds {args.seeds} --epochs {args.epochs} "
        f"--strength {args.strength:g} --bound {args.bound:g}"
    )
    write_section(
        "spectral-mnist1d",
        "## SpectralHessianRegularization on MNIST-1D (paper CNN)\n\n"
        f"Command: `{command}` (1 thread; rho of the Linear/Conv weights on 1000 training samples).\n\n"
        + table(header, body),
    )
    print(table(header, body))


if __name__ == "__main__":
    main()
