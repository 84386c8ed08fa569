"""Overhead of keeping masks: step time between pruning events, extra memory, and the cost of one pruning event.

    python benchmarks/overhead.py [--rounds 5] [--steps 30] [--threads 1]

Three variants train the same model from the same seed in one process, interleaved round by round (the order rotates
each round): dense; ``GradualMagnitudePruning`` at 90% (pruning events at steps 0 and 1 only, then masks held);
Lightning's ``ModelPruning`` at 90% (global L1, applied at the end of epoch 0); ``ChannelPruning`` removing 50% of the
FLOPs as channel masks (events at steps 0 and 1, masks held, not compacted: the element-mask engine's cost). One epoch
is ``--warmup`` batches; only steps of later epochs are timed, from ``on_train_batch_start`` to ``on_train_batch_end``
(forward, backward, optimizer step and every hook). Models: the MNIST-1D paper's CNN (batch 100) and torchvision's
ResNet-18 on generated 32x32 images (batch 32 and 128): the masks cost a fixed amount per step (one pass over the masked
gradients), so their share shrinks as the batch grows. Extra memory counts the bytes of every distinct tensor the module
holds (parameters, buffers, tensors set as attributes, masks) against the dense model, over the bytes of the masked
weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparse_lightning import ChannelPruning, GradualMagnitudePruning, masks_of
from sparse_lightning.models import MNIST1DCNN, torchvision_classifier

sys.path.insert(0, str(Path(__file__).parent))
from _report import QUIET_TRAINER, table, write_section  # noqa: E402

VARIANTS = ("dense", "sparse-lightning", "ModelPruning", "ChannelPruning")


class StepTimer(pl.Callback):
    def __init__(self, skip_steps: int) -> None:
        self.skip_steps, self.times, self._t0, self.bytes = skip_steps, [], 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.skip_steps:
            self.times.append(time.perf_counter() - self._t0)
        if trainer.global_step == trainer.max_steps:
            self.bytes = resident_bytes(pl_module)


class TimedGMP(GradualMagnitudePruning):
    event_seconds: list[float] = []

    def update_masks(self, trainer, pl_module, step) -> None:
        t0 = time.perf_counter()
        super().update_masks(trainer, pl_module, step)
        self.event_seconds.append(time.perf_counter() - t0)


class TimedChannelPruning(ChannelPruning):
    event_seconds: list[float] = []

    def update_masks(self, trainer, pl_module, step) -> None:
        t0 = time.perf_counter()
        super().update_masks(trainer, pl_module, step)
        self.event_seconds.append(time.perf_counter() - t0)


class TimedModelPruning(ModelPruning):
    event_seconds: list[float] = []

    def apply_pruning(self, amount) -> None:
        t0 = time.perf_counter()
        super().apply_pruning(amount)
        self.event_seconds.append(time.perf_counter() - t0)


def resident_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers(), *masks_of(module).values()]
    for sub in module.modules():
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


MODELS = ("mnist1d-cnn-b100", "resnet18-32px-b32", "resnet18-32px-b128")


def build(model_name: str):
    batch = int(model_name.rsplit("-b", 1)[1])
    if model_name.startswith("mnist1d-cnn"):
        model = MNIST1DCNN()
        x, y = torch.randn(batch * 8, 40), torch.randint(0, 10, (batch * 8,))
        return model, x, y, batch
    model = torchvision_classifier("resnet18", num_classes=10)
    x, y = torch.randn(batch * 8, 3, 32, 32), torch.randint(0, 10, (batch * 8,))
    return model, x, y, batch


def run_variant(model_name: str, variant: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model, x, y, batch = build(model_name)
    loader = DataLoader(TensorDataset(x[: batch * warmup], y[: batch * warmup]), batch_size=batch)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    masked_bytes = sum(m.weight.numel() * m.weight.element_size() for m, _ in targets)
    dense_bytes = resident_bytes(model)
    timer = StepTimer(skip_steps=warmup + 1)
    callbacks: list[pl.Callback] = [timer]
    if variant == "sparse-lightning":
        callbacks.append(TimedGMP(sparsity=0.9, start=0, end=1, every=1, distribution="global"))
    elif variant == "ChannelPruning":
        callbacks.append(TimedChannelPruning(0.5, cost="flops", start=0, end=1, every=1))
    elif variant == "ModelPruning":
        callbacks.append(
            TimedModelPruning(
                "l1_unstructured",
                parameters_to_prune=targets,
                amount=lambda epoch: 0.9 if epoch == 0 else 0,
                use_global_unstructured=True,
                verbose=0,
            )
        )
    trainer = pl.Trainer(
        max_steps=warmup + 1 + steps,
        **QUIET_TRAINER,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader)
    return {
        "median_step": statistics.median(timer.times),
        "extra_bytes": timer.bytes - dense_bytes,
        "masked_bytes": masked_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models:
        TimedGMP.event_seconds.clear()
        TimedModelPruning.event_seconds.clear()
        TimedChannelPruning.event_seconds.clear()
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                results[variant].append(run_variant(model_name, variant, args.steps, args.warmup))
            print(model_name, f"round {r + 1}/{args.rounds}", flush=True)
        dense = statistics.median(x["median_step"] for x in results["dense"])
        for variant in VARIANTS:
            step = statistics.median(x["median_step"] for x in results[variant])
            extra = results[variant][0]["extra_bytes"] / results[variant][0]["masked_bytes"]
            events = {
                "sparse-lightning": TimedGMP.event_seconds,
                "ModelPruning": TimedModelPruning.event_seconds,
                "ChannelPruning": TimedChannelPruning.event_seconds,
            }.get(variant, [])
            event = f"{1000 * statistics.median(events):.1f}" if events and variant != "dense" else "-"
            rows.append([model_name, variant, f"{1000 * step:.2f}", f"{step / dense:.3f}", f"{extra:.3f}", event])
            print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"## Overhead with {args.threads} torch thread(s): step time, memory, pruning events",
            "",
            f"`python benchmarks/overhead.py --rounds {args.rounds} --steps {args.steps} --threads {args.threads}` "
            f"({args.threads} torch thread(s); {args.rounds} interleaved rounds of {args.steps} timed steps per "
            "variant; the step time is the median over rounds of each run's median step; 90% sparsity).",
            "",
            table(
                [
                    "model",
                    "variant",
                    "median step (ms)",
                    "ratio to dense",
                    "extra memory / masked weight bytes",
                    "one pruning event (ms)",
                ],
                rows,
            ),
        ]
    )
    print(body)
    if not args.no_write:
        write_section(f"overhead-{args.threads}-threads", body)


if __name__ == "__main__":
    main()
