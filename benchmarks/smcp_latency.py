"""SMCP under a measured-latency budget against the same method under a FLOPs budget, on ResNet-18 (32x32).

    python benchmarks/smcp_latency.py [--levels 0.3 0.5] [--seeds 2] [--epochs 12] [--workers 2] [--rounds 15]

Does latency-aware allocation buy speed at the same accuracy? The task: generated 10-class images (oriented gratings,
random phase, contrast and colour, Gaussian noise; 3072 train, 1024 test), torchvision's ResNet-18 with 10 classes,
SGD 0.05 with momentum 0.9, weight decay 5e-4 and a cosine schedule, batch 32. Each pruned run trains with
``SoftMaskChannelPruning(level, cost=..., every=40)`` (SMCP's defaults otherwise: ``round_to=8``, weight importance, exp
ramp from 10% to 75% of training), then ``compact`` removes the channels and the test accuracy is read.

The latency table (batch 8, 32x32, 1 thread) is measured once here before training, alone on the machine, and every
``cost="latency"`` run reads it through ``latency_table=`` (the same table SMCP would measure and cache itself). After
training, with nothing else running, the dense model and every compacted one are timed forward at batch 8 (eval, no
grad, 1 thread) in rotating order, ``--rounds`` rounds of 20 calls each; reported are medians over rounds. The latency
budget is (1 - level) x the dense model's measured latency.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TABLE = RESULTS / "smcp_latency_table.json"
MODELS = RESULTS / "smcp_latency_models"


def gratings(n: int, seed: int):
    """``n`` 3x32x32 images of class c: a grating at orientation 18c degrees (+-4 jitter), random phase, frequency,
    contrast (0.5 to 1) and colour (0.5 to 1 per channel), plus Gaussian noise of standard deviation 0.5."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    theta = (y.float() * 18 + 4 * torch.randn(n, generator=g)) * math.pi / 180
    freq = 2 * math.pi * (2 + 2 * torch.rand(n, generator=g)) / 32
    phase = 2 * math.pi * torch.rand(n, generator=g)
    coords = torch.arange(32).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    wave = torch.sin(
        freq[:, None, None] * (xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None])
        + phase[:, None, None]
    )
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    x = contrast * colour * wave[:, None] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def make_task(epochs: int):
    import lightning.pytorch as pl
    import torch
    import torchvision

    class ResNetTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)
            self.example_input_array = torch.zeros(8, 3, 32, 32)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)]

    return ResNetTask()


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER
    from torch.utils.data import DataLoader, TensorDataset

    from sparse_lightning import SoftMaskChannelPruning, compact

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    model = make_task(config["epochs"])
    x, y = gratings(config["train"], seed=1000 + config["seed"])
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    callbacks = []
    if config["cost"] != "dense":
        table = {"latency_table": TABLE} if config["cost"] == "latency" else {}
        callbacks.append(
            SoftMaskChannelPruning(config["level"], cost=config["cost"], every=40, log_sparsity=False, **table)
        )
    pl.Trainer(max_epochs=config["epochs"], callbacks=callbacks, limit_val_batches=0, **QUIET_TRAINER).fit(
        model, loader
    )
    small, report = compact(model, model.example_input_array) if callbacks else (model, None)
    small.eval()
    tx, ty = gratings(1024, seed=7)
    with torch.no_grad():
        accuracy = 100.0 * float((small(tx).argmax(-1) == ty).float().mean())
    MODELS.mkdir(parents=True, exist_ok=True)
    path = MODELS / f"{config['cost']}-{config['level']}-{config['seed']}.pt"
    torch.save(small.net, path)
    flops = report["flops_after"] / report["flops_before"] if report else 1.0
    predicted = callbacks[0].removed_fraction if config["cost"] == "latency" else float("nan")
    return {**config, "acc": accuracy, "flops_ratio": flops, "predicted_latency_removed": predicted, "path": str(path)}


def measure_table(epochs: int) -> None:
    import torch

    from sparse_lightning.structure.latency import measure_latency

    torch.set_num_threads(1)
    model = make_task(epochs)
    table = measure_latency(model, model.example_input_array, points=6, round_to=8, progress=print)
    table.save(TABLE)


def time_models(results: list[dict], rounds: int) -> None:
    """Adds ``ms`` (median forward milliseconds at batch 8, 1 thread) to every result."""
    import torch
    from channel_speedup import round_times

    torch.set_num_threads(1)
    models = [torch.load(r["path"], weights_only=False).eval() for r in results]
    x = torch.randn(8, 3, 32, 32)
    times = round_times(models, x, backward=False, rounds=rounds, iterations=20)
    for i, r in enumerate(results):
        r["ms"] = 1e3 * statistics.median(t[i] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=3072)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.chdir(Path(__file__).parent)
    measure_table(args.epochs)
    base = {"epochs": args.epochs, "train": args.train}
    configs = [{"cost": "dense", "level": 0.0, "seed": s, **base} for s in range(args.seeds)]
    configs += [
        {"cost": cost, "level": level, "seed": s, **base}
        for level in args.levels
        for cost in ("flops", "latency")
        for s in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, configs))
    time_models(results, args.rounds)
    with open(RESULTS / "smcp_latency.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    write_doc(results, args)


def write_doc(results: list[dict], args: argparse.Namespace) -> None:
    from _report import mean_spread, table, write_section

    dense_ms = statistics.median(r["ms"] for r in results if r["cost"] == "dense")
    rows = []
    for level in (0.0, *args.levels):
        for cost in ("dense", "flops", "latency"):
            runs = [r for r in results if r["cost"] == cost and r["level"] == level]
            if not runs:
                continue
            ms = statistics.median(r["ms"] for r in runs)
            predicted = [r["predicted_latency_removed"] for r in runs if not math.isnan(r["predicted_latency_removed"])]
            rows.append(
                [
                    f"{level:.0%}",
                    "dense" if cost == "dense" else f"SMCP cost={cost}",
                    mean_spread([r["acc"] for r in runs]),
                    f"{1 - statistics.mean(r['flops_ratio'] for r in runs):.3f}",
                    f"{ms:.2f}",
                    f"{1 - ms / dense_ms:.3f}",
                    f"{(1 - level) * dense_ms:.2f}" if cost == "latency" else "-",
                    f"{statistics.mean(predicted):.3f}" if predicted else "-",
                ]
            )
    header = ["target", "method", "test acc % (mean ± sd)", "FLOPs removed", "latency ms (b8, 1 thread)"]
    header += ["latency removed (measured)", "latency budget ms", "latency removed (table)"]
    command = (
        f"python benchmarks/smcp_latency.py --levels {' '.join(str(v) for v in args.levels)} --seeds {args.seeds} "
        f"--epochs {args.epochs} --rounds {args.rounds}"
    )
    write_section(
        "smcp-latency",
        "## SMCP: latency budget against FLOPs budget (ResNet-18, 32x32)\n\n"
        f"Command: `{command}` ({args.seeds} seeds; generated 10-class gratings; forward latency of the compacted "
        f"models at batch 8, 1 thread, median of {args.rounds} rotating rounds; dense {dense_ms:.2f} ms).\n\n"
        + table(header, rows),
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
