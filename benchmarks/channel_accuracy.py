"""Accuracy at equal FLOPs on MNIST-1D: ChannelPruning (l1, taylor), Lightning's ModelPruning (ln_structured),
Torch-Pruning's own iterative pruner, and dense.

    python benchmarks/channel_accuracy.py [--channels 128] [--seeds 3] [--workers 2] [--epochs 100] [--methods ...]
        [--append]

The wide MNIST-1D CNN (``--channels 128``) or the paper's CNN (``--channels 25``), Adam 1e-2, batch 100, final test
accuracy on the 1000 test samples. Every pruning method works over the same window (epochs 10% to 60% of training):

- ``ChannelPruning``: ``cost="flops"``, global ranking, cubic curve, an event every 40 optimizer steps; masks during
  training, then ``sparse_lightning.compact`` (the compacted model's accuracy is measured too and must equal it).
- ``SoftMaskChannelPruning`` (SMCP) with ``weight`` and ``taylor_fo`` importance: soft masks during the same window,
  re-solved every 40 steps, ``round_to=1`` so that it meets the same FLOPs as the others (its default is 8), exp ramp;
  hard at the end, then compacted. The table counts the channels that returned after a re-solve had dropped them.
- ``ModelPruning("ln_structured", pruning_norm=1, pruning_dim=0)`` on the three convolutions at epoch ends, the same
  whole number of channels per layer that gives the FLOPs target if those channels were removed, added by a cubic
  curve. It masks only the filters (their biases still pass through ReLU), so it has no compact equivalent.
- Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance(p=1)`` (its L1 group norm), the same per-layer
  channel ratio, ``iterative_steps`` equal to ChannelPruning's number of events, each step at one of those events; it
  removes channels in place, so the optimizer is rebuilt after every step (what its users do; Adam's state restarts).

Each run uses 1 torch thread; ``--workers`` runs go in parallel.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LEVELS = (0.5, 0.7)
METHODS = ("dense", "l1", "taylor", "smcp-weight", "smcp-taylor_fo", "earlycrop-s", "modelpruning", "torch-pruning")


def uniform_channels(level: float, channels: int) -> int:
    """Channels removed from each convolution so that removing them takes away at least ``level`` of the FLOPs."""
    import torch

    from sparse_lightning.models.mnist1d import ConvNet1D
    from sparse_lightning.structure import ChannelCost, layer_flops, trace_groups

    net = ConvNet1D(channels)
    x = torch.zeros(1, 40)
    groups = [g for g in trace_groups(net, x) if g.unsupported is None]
    total, weights = layer_flops(net, x)
    shapes = {n: p.shape for n, p in net.named_parameters()}
    for k in range(1, channels):
        cost = ChannelCost(groups, shapes, weights, float(total), "flops")
        for g in groups:
            cost.drop(g.name, torch.arange(k))
        if cost.removed_fraction() >= level:
            return k
    raise ValueError(level)


def run(config: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from _report import QUIET_TRAINER

    from sparse_lightning import ChannelPruning, compact
    from sparse_lightning.core.schedules import sparsity_at
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN
    from sparse_lightning.structure import count_flops

    torch.set_num_threads(1)
    pl.seed_everything(config["seed"], verbose=False)
    channels = config["channels"]
    model = MNIST1DCNN(channels=channels)
    epochs, level, method = config["epochs"], config["level"], config["method"]
    start_ep, end_ep = round(0.1 * epochs), round(0.6 * epochs)
    data = MNIST1DDataModule()
    data.setup("fit")
    steps_per_epoch = math.ceil(len(data.train_dataloader()))
    event_steps = list(range(start_ep * steps_per_epoch, end_ep * steps_per_epoch, 40)) + [end_ep * steps_per_epoch]
    callbacks: list = []
    if method in ("l1", "taylor"):
        callbacks.append(
            ChannelPruning(
                level,
                cost="flops",
                criterion=method,
                start=f"{start_ep}ep",
                end=f"{end_ep}ep",
                every=40,
                log_sparsity=False,
            )
        )
    elif method.startswith("smcp-"):
        from sparse_lightning import SoftMaskChannelPruning

        callbacks.append(
            SoftMaskChannelPruning(
                level,
                cost="flops",
                importance=method.split("-", 1)[1],
                round_to=1,
                start=f"{start_ep}ep",
                end=f"{end_ep}ep",
                every=40,
                log_sparsity=False,
            )
        )
    elif method == "earlycrop-s":
        from sparse_lightning import EarlyCroP

        callbacks.append(EarlyCroP(level, structured=True, cost="flops", log_sparsity=False))
    elif method == "modelpruning":
        from lightning.pytorch.callbacks import ModelPruning

        k = uniform_channels(level, channels)
        convs = [(m, "weight") for m in (model.net.conv1, model.net.conv2, model.net.conv3)]

        def count(epoch: int) -> int:
            return round(sparsity_at(epoch, start_ep, end_ep, 0.0, k / channels, "cubic") * channels)

        def amount(epoch: int) -> int:
            return max(0, count(epoch + 1) - count(epoch)) if start_ep <= epoch + 1 <= end_ep else 0

        callbacks.append(
            ModelPruning(
                "ln_structured",
                parameters_to_prune=convs,
                amount=amount,
                pruning_norm=1,
                pruning_dim=0,
                use_global_unstructured=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        )
    elif method == "torch-pruning":
        import torch_pruning as tp

        ratio = uniform_channels(level, channels) / channels
        pruner = tp.pruner.MetaPruner(
            model.net,
            torch.zeros(1, 40),
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            iterative_steps=len(event_steps),
            ignored_layers=[model.net.linear],
        )

        class TorchPruningSteps(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step in event_steps:
                    pruner.step()
                    trainer.strategy.setup_optimizers(trainer)  # the old optimizer holds the removed tensors

        callbacks.append(TorchPruningSteps())
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, **QUIET_TRAINER)
    began = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - began
    x = torch.zeros(1, 40)
    if method == "earlycrop-s":  # compacted during fit
        small = model
        flops_ratio = count_flops(model, x)[0] / count_flops(MNIST1DCNN(channels=channels), x)[0]
    elif method in ("l1", "taylor") or method.startswith("smcp-"):
        small, report = compact(model, x)
        flops_ratio = report["flops_after"] / report["flops_before"]
    else:
        small = model
        dense_flops = count_flops(MNIST1DCNN(channels=channels), x)[0]
        flops_ratio = count_flops(model, x)[0] / dense_flops if method != "modelpruning" else float("nan")
    data.setup("test")
    accuracy = evaluate(model, data.test_dataloader())
    compact_accuracy = evaluate(small, data.test_dataloader())
    convs = [model.net.conv1, model.net.conv2, model.net.conv3]
    zero_filters = sum(int((c.weight.detach().flatten(1) == 0).all(1).sum()) for c in convs)
    filters = sum(c.weight.shape[0] for c in convs)
    return {
        **config,
        "acc": accuracy,
        "compact_acc": compact_accuracy,
        "flops_ratio": flops_ratio,
        "conv_filters": filters,
        "zero_filters": zero_filters,
        "returned": getattr(callbacks[0], "returned", 0) if callbacks else 0,
        "seconds": seconds,
        "event": _event(callbacks[0], seconds / trainer.global_step) if method == "earlycrop-s" else "",
    }


def _event(crop, step_seconds: float) -> str:
    return (
        f"epoch {crop.pruned_epoch} ({crop.trigger}); {crop.rescorings} scorings, {crop.prune_seconds:.1f} s = "
        f"{crop.prune_seconds / step_seconds:.0f} steps"
    )


def _typed(row: dict) -> dict:
    out: dict = {}
    for k, v in row.items():
        try:
            out[k] = (
                int(v) if k in ("seed", "epochs", "channels", "conv_filters", "zero_filters", "returned") else float(v)
            )
            if k == "event":
                out[k] = v
        except (TypeError, ValueError):
            out[k] = v
    return out


def evaluate(model, loader) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, default=128, choices=(25, 128))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--append", action="store_true", help="keep the other methods' rows of the existing CSV")
    args = parser.parse_args()
    base = {"channels": args.channels, "epochs": args.epochs}
    configs = [{"method": "dense", "level": 0.0, "seed": s, **base} for s in range(args.seeds)]
    configs += [
        {"method": m, "level": level, "seed": s, **base}
        for level in LEVELS
        for m in args.methods
        if m != "dense"
        for s in range(args.seeds)
    ]
    if "dense" not in args.methods:
        configs = [c for c in configs if c["method"] != "dense"]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, configs))
    RESULTS.mkdir(exist_ok=True)
    if args.append and (RESULTS / "channel_accuracy.csv").is_file():
        with open(RESULTS / "channel_accuracy.csv") as f:
            rows = [_typed(r) for r in csv.DictReader(f)]
        kept = [r for r in rows if r["method"] not in args.methods or r["channels"] != args.channels]
        results = kept + results
    with open(RESULTS / "channel_accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[-1]), restval="")
        writer.writeheader()
        writer.writerows(results)
    write_doc(results)


def write_doc(results: list[dict]) -> None:
    from _report import table

    names = {
        "dense": "dense",
        "l1": "ChannelPruning l1",
        "taylor": "ChannelPruning taylor",
        "smcp-weight": "SoftMaskChannelPruning weight",
        "smcp-taylor_fo": "SoftMaskChannelPruning taylor_fo",
        "earlycrop-s": "EarlyCroP structured (compacted during fit)",
        "modelpruning": "ModelPruning ln_structured (masks only)",
        "torch-pruning": "Torch-Pruning MetaPruner (L1 group)",
    }
    rows = []
    for channels, model in ((128, "wide CNN (128)"), (25, "paper CNN (25)")):
        for level in (0.0, *LEVELS):
            for method, label in names.items():
                runs = [
                    r for r in results if r["method"] == method and r["level"] == level and r["channels"] == channels
                ]
                if runs:
                    rows.append(_row(model, level, method, label, runs))
    header = ["model", "FLOPs removed", "method", "test acc % (mean ± sd)", "FLOPs ratio", "compacted acc = masked"]
    text = table([*header, "conv filters left (non-zero)", "channels returned (soft masks)"], rows)
    from _report import write_section

    commands = sorted({f"python benchmarks/channel_accuracy.py --channels {r['channels']}" for r in results})
    write_section(
        "channel-accuracy",
        "## Channel pruning: accuracy at equal FLOPs on MNIST-1D\n\n"
        f"Commands: {', '.join(f'`{c} --seeds 3 --epochs 100`' for c in commands)} (3 seeds, 1 thread each; the "
        "SMCP rows of the wide CNN were added later by `--methods smcp-weight smcp-taylor_fo --append`, the "
        "EarlyCroP-S rows and the training times by `--methods dense earlycrop-s --append`).\n\n"
        f"{text}{_time_table(results)}",
    )
    print(text)


def _time_table(results: list[dict]) -> str:
    """Whole-run training time against dense (the rows that recorded it), and EarlyCroP-S's prune events."""
    from _report import table

    timed = [r for r in results if isinstance(r.get("seconds"), float)]
    rows = []
    for channels in sorted({r["channels"] for r in timed}, reverse=True):
        dense = [r["seconds"] for r in timed if r["channels"] == channels and r["method"] == "dense"]
        if not dense:
            continue
        for level in sorted({r["level"] for r in timed}):
            for method in METHODS:
                runs = [r for r in timed if (r["channels"], r["level"], r["method"]) == (channels, level, method)]
                if runs:
                    seconds = statistics.median(r["seconds"] for r in runs)
                    events = "; ".join(r["event"] for r in runs if r.get("event")) or "-"
                    rows.append(
                        [
                            channels,
                            f"{level:.0%}",
                            method,
                            f"{seconds:.0f}",
                            f"{seconds / statistics.median(dense):.2f}",
                            events,
                        ]
                    )
    if not rows:
        return ""
    header = ["channels", "FLOPs removed", "method", "fit seconds (median)", "vs dense", "prune event (per seed)"]
    return "\n\nWhole training run (2 runs in parallel, 1 thread each):\n\n" + table(header, rows)


def _row(model: str, level: float, method: str, label: str, runs: list[dict]) -> list[str]:
    from _report import mean_spread

    ratios = [r["flops_ratio"] for r in runs if not math.isnan(r["flops_ratio"])]
    same = all(r["acc"] == r["compact_acc"] for r in runs)
    compacted = method in ("l1", "taylor") or method.startswith("smcp")
    return [
        model,
        f"{level:.0%}",
        label,
        mean_spread([r["acc"] for r in runs]),
        f"{statistics.mean(ratios):.3f}" if ratios else "- (not compactable)",
        ("yes" if same else "NO") if compacted else "-",
        f"{statistics.mean(r['conv_filters'] - r['zero_filters'] for r in runs):.0f} of {3 * runs[0]['channels']}",
        f"{statistics.mean(int(r.get('returned') or 0) for r in runs):.0f}" if method.startswith("smcp") else "-",
    ]


if __name__ == "__main__":
    main()
