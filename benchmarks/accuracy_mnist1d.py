"""Accuracy on MNIST-1D: dense, Lightning's ``ModelPruning`` and ``GradualMagnitudePruning`` at equal sparsity.

    python benchmarks/accuracy_mnist1d.py [--seeds 3] [--workers 2] [--quick]

Paper CNN (25 channels, ~5k weights): 200 epochs; wide CNN (128 channels): 100 epochs; Adam 1e-2, batch 100, the
4000 training samples of MNIST-1D, final test accuracy on its 1000 test samples. Both pruning methods use global
magnitude ranking over the same window (epochs 10% to 60% of training, cubic curve) and reach the same sparsity:
``ModelPruning`` prunes at epoch ends with an ``amount`` that compounds on what is left, so each event's amount is a
whole number of weights derived from the cubic target; ours prunes every 40 optimizer steps (once an epoch).
The sparsity each run really reached is reported. Each run uses 1 torch thread; ``--workers`` runs go in parallel.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parents[1] / "docs" / "figures"


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER
    from torch import nn

    from sparse_lightning import GradualMagnitudePruning
    from sparse_lightning.bench import modelpruning_callback
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    model = MNIST1DCNN(channels=config["channels"])
    epochs, sparsity = config["epochs"], config["sparsity"]
    start_ep, end_ep = round(0.1 * epochs), round(0.6 * epochs)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    total = sum(m.weight.numel() for m, _ in targets)
    callbacks = []
    if config["method"] == "mfac-pruning":
        from sparse_lightning import MFACPruning

        callbacks.append(
            MFACPruning(sparsity=sparsity, start=f"{start_ep}ep", end=f"{end_ep}ep", every=40, log_sparsity=False)
        )
    elif config["method"].startswith("gmp"):
        callbacks.append(
            GradualMagnitudePruning(
                sparsity=sparsity,
                start=f"{start_ep}ep",
                end=f"{end_ep}ep",
                every=40,
                distribution=config["method"].split("-")[1],
                log_sparsity=False,
            )
        )
    elif config["method"] in DST:
        from sparse_lightning import SET, SNIP, GaP, RigL, StaticRandomMask

        name = config["method"]
        if name == "static-erk":
            callbacks.append(StaticRandomMask(sparsity=sparsity, seed=config["seed"], log_sparsity=False))
        elif name == "gap":
            phase = f"{max(1, epochs // 40)}ep"
            callbacks.append(
                GaP(sparsity=sparsity, parts=4, phase=phase, cycles=2, seed=config["seed"], log_sparsity=False)
            )
        elif name == "snip":
            callbacks.append(SNIP(sparsity=sparsity, log_sparsity=False))
        elif name in ("set", "set-er"):
            distribution = "er" if name == "set-er" else "erk"
            callbacks.append(SET(sparsity=sparsity, distribution=distribution, seed=config["seed"], log_sparsity=False))
        else:
            callbacks.append(
                RigL(sparsity=sparsity, distribution=name.split("-")[1], seed=config["seed"], log_sparsity=False)
            )
    elif config["method"] == "modelpruning":
        callbacks.append(modelpruning_callback(model, sparsity, start_ep, end_ep))
    elif config["method"] == "acdc":
        from sparse_lightning import ACDC

        callbacks.append(ACDC(sparsity=sparsity, log_sparsity=False))
    elif config["method"].startswith("earlycrop"):
        from sparse_lightning import EarlyCroP

        steps = int(config["method"].split("-steps")[1]) if "-steps" in config["method"] else 100
        prune_at = "100ep" if config["method"] == "earlycrop-ref" else 0.5
        callbacks.append(EarlyCroP(sparsity=sparsity, steps=steps, prune_at=prune_at, log_sparsity=False))
    trainer = pl.Trainer(
        max_epochs=epochs,
        **QUIET_TRAINER,
        check_val_every_n_epoch=10**6,
        callbacks=callbacks,
    )
    data = MNIST1DDataModule(batch_size=100, val_fraction=0.0)
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    event = ""
    if config["method"].startswith("earlycrop"):
        crop = callbacks[0]
        step_seconds = seconds / trainer.global_step
        event = (
            f"epoch {crop.pruned_epoch} ({crop.trigger}); {crop.rescorings} scorings, {crop.prune_seconds:.1f} s "
            f"= {crop.prune_seconds / step_seconds:.0f} steps"
        )
    return {**config, "test_acc": 100 * acc, "achieved": zeros / total, "seconds": seconds, "event": event}


DST = ("static-erk", "rigl-erk", "rigl-uniform", "set", "set-er", "snip", "gap")
EARLYCROP = ("earlycrop", "earlycrop-ref", "earlycrop-steps10", "earlycrop-steps0")
METHODS = ("dense", "modelpruning", "gmp-global", "gmp-erk", "gmp-uniform", "mfac-pruning", "acdc", *DST, *EARLYCROP)
SETTINGS = {25: (200, [0.8, 0.9, 0.95]), 128: (100, [0.8, 0.9, 0.95, 0.98])}


def configs(seeds: int, quick: bool, methods: list[str], channels: list[int], levels: list[float] | None) -> list[dict]:
    out = []
    for width in channels:
        epochs, width_levels = SETTINGS[width]
        epochs = 10 if quick else epochs
        for seed in range(seeds):
            for method in methods:
                if method == "dense":
                    out.append({"channels": width, "epochs": epochs, "method": method, "sparsity": 0.0, "seed": seed})
                    continue
                for level in levels or width_levels:
                    if method == "modelpruning" and level > 0.95:
                        continue
                    out.append({"channels": width, "epochs": epochs, "method": method, "sparsity": level, "seed": seed})
    return out


def key(row: dict) -> tuple:
    return (int(row["channels"]), row["method"], float(row["sparsity"]), int(row["seed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["dense", "modelpruning", "gmp-global"], choices=METHODS)
    parser.add_argument("--channels", nargs="+", type=int, default=[25, 128], choices=sorted(SETTINGS))
    parser.add_argument("--levels", nargs="+", type=float, default=None, help="sparsities (default: per width)")
    parser.add_argument("--quick", action="store_true", help="10 epochs, to check the script; writes nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/benchmarks.md from the CSV")
    args = parser.parse_args()
    if args.report_only:
        write_report(RESULTS / "accuracy_mnist1d.csv")
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    todo = configs(args.seeds, args.quick, args.methods, args.channels, args.levels)
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i, result in enumerate(pool.map(run, todo), 1):
            rows.append(result)
            print(
                f"[{i}/{len(todo)}] {result['method']} c={result['channels']} s={result['sparsity']} "
                f"seed={result['seed']}: acc {result['test_acc']:.1f}, sparsity {result['achieved']:.4f}, "
                f"{result['seconds']:.0f}s",
                flush=True,
            )
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    out_csv = RESULTS / "accuracy_mnist1d.csv"
    merged = {}
    if out_csv.exists():
        with out_csv.open() as f:
            merged = {key(r): r for r in csv.DictReader(f)}
    merged.update({key(r): r for r in rows})
    fields = ["channels", "epochs", "method", "sparsity", "seed", "test_acc", "achieved", "seconds", "event"]
    with out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(sorted(merged.values(), key=key))
    write_report(out_csv)


LABELS = {
    "modelpruning": "Lightning `ModelPruning` (global L1)",
    "gmp-global": "`GradualMagnitudePruning`, global",
    "gmp-erk": "`GradualMagnitudePruning`, ERK",
    "gmp-uniform": "`GradualMagnitudePruning`, uniform",
    "mfac-pruning": "`MFACPruning`, global (64 gradients, blocks of 128, 16 recomputations)",
    "acdc": "`ACDC`, global (defaults: dense to 10%, phases of 5%, sparse from 90%)",
    "static-erk": "`StaticRandomMask`, ERK (random mask, never updated)",
    "rigl-erk": "`RigL`, ERK (defaults: every 100 steps, alpha 0.3, end 75%)",
    "rigl-uniform": "`RigL`, uniform",
    "set": "`SET`, ERK (defaults)",
    "set-er": "`SET`, ER (the paper's distribution, made for MLPs)",
    "snip": "`SNIP` (1 batch, global)",
    "gap": "`GaP`, cyclic, 4 parts x 2 cycles, phases of 1/40 of training",
    "earlycrop": "`EarlyCroP` (defaults: 5 batches, 100 steps, prune_at half of training)",
    "earlycrop-ref": "`EarlyCroP`, prune_at epoch 100 (the reference's; = the last epoch of a 100-epoch run)",
    "earlycrop-steps10": "`EarlyCroP`, 10 steps",
    "earlycrop-steps0": "`EarlyCroP`, 0 steps (one scoring at 50%, one at the target)",
}


def write_report(path: Path) -> None:
    from _report import mean_spread, table, write_section

    from sparse_lightning.plots import plot_accuracy_vs_sparsity

    with path.open() as f:
        rows = [
            {
                **r,
                "method": "gmp-global" if r["method"] == "gmp" else r["method"],
                "channels": int(r["channels"]),
                "sparsity": float(r["sparsity"]),
                "test_acc": float(r["test_acc"]),
                "achieved": float(r["achieved"]),
            }
            for r in csv.DictReader(f)
        ]
    seeds = len({r["seed"] for r in rows})
    body = [
        "## Accuracy on MNIST-1D",
        "",
        f"`python benchmarks/accuracy_mnist1d.py --seeds {seeds} --methods dense modelpruning gmp-global`, "
        "`... --methods gmp-erk gmp-uniform --channels 25`, "
        "`... --methods static-erk rigl-erk rigl-uniform set set-er snip gap --levels 0.8 0.9 0.95`, "
        "`... --methods mfac-pruning --channels 25 --levels 0.9 0.95`, "
        "`... --methods earlycrop --levels 0.9 0.95 0.98`, `... --methods earlycrop-ref --channels 128 --levels "
        "0.9 0.95 0.98`, "
        "`... --methods gmp-global snip rigl-erk --levels 0.98 --channels 25`, "
        "`... --methods snip rigl-erk --levels 0.98 --channels 128` and "
        "`... --methods earlycrop-steps10 earlycrop-steps0 --channels 25 --levels 0.95` and "
        "`... --methods acdc --levels 0.8 0.9 0.95` (1 torch thread a run; raw "
        "rows in "
        "`benchmarks/results/accuracy_mnist1d.csv`, which each run updates). Test accuracy in %, mean ± standard "
        "deviation over seeds (n = number of seeds); the sparsity is the fraction of exact zeros over all conv/linear "
        "weights that each run really reached (mean). All pruning runs use the same window (10% to 60% of training) "
        "and a cubic target; `ModelPruning` prunes at epoch ends with whole-number amounts that follow that target.",
    ]
    for channels in sorted({r["channels"] for r in rows}):
        sub = [r for r in rows if r["channels"] == channels]
        epochs = sub[0]["epochs"]
        dense = [r["test_acc"] for r in sub if r["method"] == "dense"]
        table_rows = [["dense", "0", mean_spread(dense), str(len(dense)), "-", "-"]]
        for level in sorted({r["sparsity"] for r in sub if r["method"] != "dense"}):
            for method, label in LABELS.items():
                runs = [r for r in sub if r["method"] == method and r["sparsity"] == level]
                if runs:
                    achieved = sum(r["achieved"] for r in runs) / len(runs)
                    accs = [r["test_acc"] for r in runs]
                    events = "; ".join(r["event"] for r in runs if r.get("event")) or "-"
                    table_rows.append(
                        [label, f"{level:.0%}", mean_spread(accs), str(len(runs)), f"{achieved:.4f}", events]
                    )
        name = "paper CNN (25 channels)" if channels == 25 else f"wide CNN ({channels} channels)"
        figure = FIGURES / f"accuracy_mnist1d_c{channels}.png"
        series: dict[str, list[tuple[float, float, float]]] = {}
        for r in sub:
            if r["method"] != "dense":
                series.setdefault(r["method"], []).append((r["sparsity"], r["achieved"], r["test_acc"]))
        plot_accuracy_vs_sparsity(series, dense, figure, title=f"MNIST-1D, {name}, {epochs} epochs")
        body += [
            "",
            f"### {name}, {epochs} epochs",
            "",
            f"![test accuracy against achieved sparsity, {name}]({figure.relative_to(FIGURES.parent)})",
            "",
            table(
                ["method", "target", "test accuracy", "n", "achieved sparsity", "prune event (per seed)"], table_rows
            ),
        ]
    write_section("accuracy", "\n".join(body))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
