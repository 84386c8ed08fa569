"""Speed-up of compacted channel pruning: FLOPs ratio, latency ratio and efficiency (1 torch thread).

    python benchmarks/channel_speedup.py [--rounds 7] [--quick]

For each model, input and level (30/50/70% of the channels of every prunable group removed, L1 criterion, uniform
ranking, so each layer shrinks alike as in Torch-Pruning's per-layer ``pruning_ratio``), the masks are installed,
``sparse_lightning.compact`` removes the channels, and the dense and the compacted model are timed in eval mode
(forward, no grad) and in train mode (forward + backward; at batch 1 with normalization in eval mode), one after the
other in each round, the order alternating; a round times each model over a fixed number of iterations after one warm-up
call. Reported: the FLOPs ratio (compacted / dense, ``torch.utils.flop_counter``), the speed-up (median over rounds of
dense time / compacted time) and the efficiency, speed-up x FLOPs ratio (1.0: time falls exactly as FLOPs do). The
same model pruned by Torch-Pruning alone (its ``MetaPruner``, same per-layer ratio) is timed in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision
from _report import table, write_section

from sparse_lightning import compact
from sparse_lightning.core.masks import MaskSet
from sparse_lightning.models.mnist1d import ConvNet1D
from sparse_lightning.structure import ChannelCost, channel_masks, count_flops, trace_groups
from sparse_lightning.structure.selection import magnitude_scores, select_channels

RESULTS = Path(__file__).parent / "results"

CASES = [
    ("resnet18", "32x32", 8, lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    ("resnet18", "32x32", 1, lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    ("resnet18", "224x224", 8, lambda: torchvision.models.resnet18(), (3, 224, 224)),
    ("resnet18", "224x224", 1, lambda: torchvision.models.resnet18(), (3, 224, 224)),
    ("mobilenet_v2", "224x224", 8, lambda: torchvision.models.mobilenet_v2(), (3, 224, 224)),
    ("mobilenet_v2", "224x224", 1, lambda: torchvision.models.mobilenet_v2(), (3, 224, 224)),
    ("mnist1d wide cnn", "40", 100, lambda: ConvNet1D(128), (40,)),
]
LEVELS = (0.3, 0.5, 0.7)


def pruned(make, shape: tuple[int, ...], level: float) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = make().eval()
    example = torch.randn(1, *shape)
    groups = [g for g in trace_groups(model, example) if g.unsupported is None]
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    cost = ChannelCost(groups, shapes, {}, 0.0, "channels")
    scores = {g.name: magnitude_scores(g, params, "l1") for g in groups}
    keeps = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in groups}
    keeps = select_channels(groups, scores, keeps, cost, level, ranking="uniform")
    for name, mask in channel_masks(groups, keeps, shapes).items():
        MaskSet.of(model).add(name, params[name], mask)
    MaskSet.of(model).apply_to_weights(params)
    small, report = compact(model, example)
    return model, small, report


def seconds(model: torch.nn.Module, x: torch.Tensor, backward: bool, iterations: int) -> float:
    model.train(backward and x.shape[0] > 1)  # batch 1 backward with BN in eval mode (train mode needs 2+ values)
    for p in model.parameters():
        p.requires_grad_(backward)

    def once() -> None:
        if backward:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)

    once()
    start = time.perf_counter()
    for _ in range(iterations):
        once()
    return (time.perf_counter() - start) / iterations


def torch_pruning_alone(make, shape: tuple[int, ...], level: float) -> torch.nn.Module:
    """The same model pruned by Torch-Pruning's own ``MetaPruner`` (L1 group importance, per-layer ratio ``level``,
    the classifier left alone): the reference our compaction must not fall behind."""
    import torch_pruning as tp

    torch.manual_seed(0)
    model = make().eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, *shape),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=level,
        ignored_layers=[last],
    )
    pruner.step()
    return model


def round_times(models: list, x, backward: bool, rounds: int, iterations: int) -> list[list[float]]:
    """Per round, each model's seconds per call; the order rotates from round to round."""
    result = []
    for r in range(rounds):
        order = list(range(r % len(models), len(models))) + list(range(r % len(models)))
        times = {i: seconds(models[i], x, backward, iterations) for i in order}
        result.append([times[i] for i in range(len(models))])
    return result


def measure(models: list, x, backward: bool, rounds: int, iterations: int) -> list[float]:
    """Per model after the first (dense), the median over rounds of dense time / its time."""
    times = round_times(models, x, backward, rounds, iterations)
    return [statistics.median(t[0] / t[i] for t in times) for i in range(1, len(models))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds, the 32x32 and MNIST-1D cases only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [c for c in CASES if not args.quick or c[1] != "224x224"]
    rounds = 3 if args.quick else args.rounds
    rows = []
    for name, size, batch, make, shape in cases:
        for level in LEVELS:
            dense, small, report = pruned(make, shape, level)
            flops_ratio = report["flops_after"] / report["flops_before"]
            alone = torch_pruning_alone(make, shape, level)
            alone_ratio = count_flops(alone, torch.randn(1, *shape))[0] / report["flops_before"]
            x = torch.randn(batch, *shape)
            budget = 0.25 if size != "224x224" else 0.8  # seconds of dense work per timing
            per_call = seconds(dense, x, False, 1)
            iterations = max(1, round(budget / max(per_call, 1e-6)))
            forward, forward_alone = measure([dense, small, alone], x, False, rounds, iterations)
            train, train_alone = measure([dense, small, alone], x, True, rounds, max(1, iterations // 3))
            rows.append(
                [
                    name,
                    size,
                    batch,
                    f"{level:.0%}",
                    f"{flops_ratio:.3f}",
                    f"{report['params_after'] / report['params_before']:.3f}",
                    f"{forward:.2f}x",
                    f"{forward * flops_ratio:.2f}",
                    f"{train:.2f}x",
                    f"{train * flops_ratio:.2f}",
                    f"{alone_ratio:.3f}",
                    f"{forward_alone * alone_ratio:.2f} / {train_alone * alone_ratio:.2f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = [
        "model",
        "input",
        "batch",
        "channels removed",
        "FLOPs ratio",
        "params ratio",
        "forward speed-up",
        "forward efficiency",
        "fwd+bwd speed-up",
        "fwd+bwd efficiency",
        "Torch-Pruning alone: FLOPs ratio",
        "its efficiency fwd / fwd+bwd",
    ]
    text = table(header, rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "channel_speedup.md").write_text(text + "\n")
    command = "python benchmarks/channel_speedup.py" + (" --quick" if args.quick else f" --rounds {rounds}")
    write_section(
        "channel-speedup",
        "## Channel pruning: speed-up of the compacted model\n\n"
        f"Command: `{command}` (1 torch thread, {rounds} interleaved rounds, median of per-round ratios).\n\n{text}",
    )


if __name__ == "__main__":
    main()
