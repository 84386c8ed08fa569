"""Neuron pruning with the spectral regularizer on MNIST-1D against ChannelPruning (l2) at the same neuron count, and
the cost of a regularized step (``hvp`` against ``kfac``) in dense-step equivalents.

    python benchmarks/spectral_pruning.py [--seeds 3] [--workers 2] [--epochs 100] [--rounds 3]

Accuracy (section ``spectral-pruning``): the paper CNN (25 channels), Adam 1e-2, batch 100, ``--epochs`` epochs;
every pruning run removes 50% of the 75 convolution channels (``cost="channels"``) on the same schedule (cubic,
epochs 10% to 60%, an event every 40 steps), masks during training:

- ``l2``: ``ChannelPruning(0.5, cost="channels", criterion="l2")`` (global ranking, as its default).
- ``saliency``: ``SpectralHessianRegularization(strength=0, sparsity=0.5)``: the Kronecker-factored saliency alone.
- ``spectral-kfac`` / ``spectral-hvp``: the same with the penalty, mu 0.01, K 0, every step, ``method="kfac"`` or
  ``"hvp"`` (Ebrahimi & Klabjan prune and regularize together).
- ``l0-structured``: ``ControlledSparsity(0.5, structured=True, constraint="model")``, one hard-concrete gate per
  channel, at most half of them expected open (a constraint, not a count: the channels removed vary).
- ``dense``: no pruning.

Reported: test accuracy of the pruned model, rho(H) at the end (power iteration, tolerance 1e-6, on 1000 training
samples, the Linear/Conv weights), channels removed. Each run uses 1 torch thread; ``--workers`` runs go in parallel.

Cost (section ``spectral-cost``): ``--rounds`` rounds of three 2-epoch runs (plain, ``hvp``, ``kfac``, mu 0.01, K 0,
every step), interleaved in one process with 1 torch thread, on the paper CNN and the MLP; the median time per
optimizer step and its ratio to the plain run of the same round (median over rounds).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "l2", "saliency", "spectral-kfac", "spectral-hvp", "l0-structured")
LEVEL = 0.5


def final_rho(model, data) -> float:
    """rho(H) of the model's Linear/Conv weights on the first 1000 training samples (eval mode)."""
    import torch
    from torch import nn

    from sparse_lightning.core.spectral import spectral_radius
    from sparse_lightning.core.targets import select_parameters

    data.setup("fit")
    x, y = data.train_set[:1000]
    model.eval()
    named = dict(model.named_parameters())
    params = [named[n] for n in select_parameters(model)]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    return spectral_radius(grads, params, tolerance=1e-6, max_iterations=5000).rho


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER

    from sparse_lightning import ChannelPruning, SpectralHessianRegularization
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    model = MNIST1DCNN(channels=25)
    epochs, method = config["epochs"], config["method"]
    schedule = {"start": f"{round(0.1 * epochs)}ep", "end": f"{round(0.6 * epochs)}ep"}
    callbacks: list = []
    if method == "l2":
        callbacks.append(
            ChannelPruning(LEVEL, cost="channels", criterion="l2", every=40, log_sparsity=False, **schedule)
        )
    elif method == "l0-structured":
        from sparse_lightning import ControlledSparsity

        callbacks.append(
            ControlledSparsity(LEVEL, structured=True, constraint="model", seed=config["seed"], log_sparsity=False)
        )
    elif method != "dense":
        strength = 0.0 if method == "saliency" else 0.01
        spectral_method = "hvp" if method == "spectral-hvp" else "kfac"
        callbacks.append(
            SpectralHessianRegularization(
                strength, bound=0.0, method=spectral_method, sparsity=LEVEL, prune_every=40, log=False, **schedule
            )
        )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, check_val_every_n_epoch=10**6, **QUIET_TRAINER)
    data = MNIST1DDataModule(batch_size=100, val_fraction=0.0)
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    removed = sum(int((~k).sum()) for k in callbacks[0].keeps.values()) if callbacks else 0
    return {
        **config,
        "acc": 100 * acc,
        "rho": final_rho(model, data),
        "removed": removed,
        "step_ms": 1e3 * seconds / trainer.global_step,
    }


def step_costs(model_name: str, rounds: int, epochs: int = 2) -> dict[str, list[float]]:
    """Per round, ms per optimizer step of a plain, an ``hvp`` and a ``kfac`` run, interleaved."""
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER

    from sparse_lightning import SpectralHessianRegularization
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN, MNIST1DMLP

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"plain": [], "hvp": [], "kfac": []}
    for r in range(rounds):
        for kind in times:
            pl.seed_everything(r, verbose=False)
            model = MNIST1DCNN(channels=25) if model_name == "cnn" else MNIST1DMLP()
            callbacks = [] if kind == "plain" else [SpectralHessianRegularization(bound=0.0, method=kind, log=False)]
            trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, check_val_every_n_epoch=10**6, **QUIET_TRAINER)
            began = time.perf_counter()
            trainer.fit(model, datamodule=MNIST1DDataModule(batch_size=100, val_fraction=0.0))
            times[kind].append(1e3 * (time.perf_counter() - began) / trainer.global_step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--append", action="store_true", help="keep the CSV's rows of the other methods")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        configs = [
            {"method": m, "seed": s, "epochs": args.epochs} for s in range(args.seeds) for m in reversed(args.methods)
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run, configs))
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "spectral_pruning.csv"
        if args.append and path.exists():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r["method"] not in args.methods]
            results = [{k: _number(v) for k, v in r.items()} for r in kept] + results
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
        write_accuracy(results, args)
    if args.skip_cost:
        return
    costs = {name: step_costs(name, args.rounds) for name in ("cnn", "mlp")}
    write_costs(costs, args)


def _number(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_accuracy(results: list[dict], args: argparse.Namespace) -> None:
    from _report import mean_spread, table, write_section

    labels = {
        "dense": "dense",
        "l2": "`ChannelPruning(cost='channels', criterion='l2')`",
        "saliency": "Kronecker-factored saliency, no penalty (strength 0)",
        "spectral-kfac": "saliency + K-FAC penalty (mu 0.01, K 0)",
        "spectral-hvp": "saliency + Hessian penalty, power iteration (mu 0.01, K 0)",
        "l0-structured": "`ControlledSparsity(0.5, structured=True, constraint='model')`",
    }
    body = []
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        body.append(
            [
                labels[method],
                mean_spread([r["acc"] for r in rows]),
                " / ".join(f"{r['rho']:.2f}" for r in rows),
                " / ".join(str(r["removed"]) for r in rows),
                f"{statistics.median(r['step_ms'] for r in rows):.1f}",
            ]
        )
    header = ["run", "test acc %", "rho(H) at the end (per seed)", "channels removed of 75", "ms per step"]
    command = (
        f"python benchmarks/spectral_pruning.py --seeds {args.seeds} --epochs {args.epochs}`, then `... --methods "
        "l0-structured --append --skip-cost"
    )
    write_section(
        "spectral-pruning",
        "## Neuron pruning with the spectral regularizer on MNIST-1D (paper CNN)\n\n"
        f"Commands: `{command}` (1 thread a run, 50% of the convolution channels, epochs 10%-60%, an event every 40 "
        "steps; ms per step from runs sharing the 2 cores, so only a rough guide: see `spectral-cost`).\n\n"
        + table(header, body),
    )
    print(table(header, body))


def write_costs(costs: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    from _report import table, write_section

    body = []
    for model, times in costs.items():
        for kind in ("plain", "hvp", "kfac"):
            ratios = [t / p for t, p in zip(times[kind], times["plain"], strict=True)]
            body.append(
                [
                    "paper CNN (25 channels)" if model == "cnn" else "MLP (100 hidden)",
                    kind,
                    f"{statistics.median(times[kind]):.1f}",
                    f"{statistics.median(ratios):.1f}",
                ]
            )
    header = ["model", "step", "ms per step (median)", "dense-step equivalents (median ratio)"]
    write_section(
        "spectral-cost",
        "## Cost of a regularized step: power iteration against Kronecker factors\n\n"
        f"Command: `python benchmarks/spectral_pruning.py --skip-accuracy --rounds {args.rounds}` (1 torch thread, one "
        "process; "
        f"{args.rounds} rounds of a plain, an `hvp` and a `kfac` run of 2 epochs, interleaved; mu 0.01, K 0, every "
        "step).\n\n" + table(header, body),
    )
    print(table(header, body))


if __name__ == "__main__":
    main()
