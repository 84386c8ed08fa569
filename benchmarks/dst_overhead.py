"""Amortized step time of RigL against dense training, measured in one run.

    python benchmarks/dst_overhead.py [--rounds 5] [--steps 400] [--threads 1]

Dense and ``RigL`` (defaults: every 100 steps, end 75% of training, ERK, 90%) train the MNIST-1D paper CNN and its
wide variant from the same seed, interleaved round by round; the *mean* step time (mask updates and skipped steps
included) from ``on_train_batch_start`` to ``on_train_batch_end`` over all steps is compared.
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
from torch.utils.data import DataLoader, TensorDataset

from sparse_lightning import RigL
from sparse_lightning.models import MNIST1DCNN

sys.path.insert(0, str(Path(__file__).parent))
from _report import table, write_section  # noqa: E402


class MeanTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t0)


def run(channels: int, variant: str, steps: int) -> float:
    torch.manual_seed(0)
    model = MNIST1DCNN(channels=channels)
    loader = DataLoader(TensorDataset(torch.randn(100 * steps, 40), torch.randint(0, 10, (100 * steps,))), 100)
    timer = MeanTimer()
    callbacks = [timer] + ([RigL(sparsity=0.9, log_sparsity=False)] if variant == "RigL" else [])
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return statistics.mean(timer.times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for channels in (25, 128):
        times: dict[str, list[float]] = {"dense": [], "RigL": []}
        for r in range(args.rounds):
            for variant in ("dense", "RigL") if r % 2 == 0 else ("RigL", "dense"):
                times[variant].append(run(channels, variant, args.steps))
        dense = statistics.median(times["dense"])
        rigl = statistics.median(times["RigL"])
        rows.append(
            [f"MNIST-1D CNN, {channels} channels", f"{1000 * dense:.2f}", f"{1000 * rigl:.2f}", f"{rigl / dense:.3f}"]
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## RigL amortized step time",
            "",
            f"`python benchmarks/dst_overhead.py --rounds {args.rounds} --steps {args.steps} --threads {args.threads}` "
            f"({args.threads} torch thread(s); mean step time over {args.steps} steps with mask updates every 100 "
            "steps until 75% of training, median over interleaved rounds; batch 100; RigL at 90% with ERK).",
            "",
            table(["model", "dense (ms/step)", "RigL (ms/step)", "ratio"], rows),
        ]
    )
    print(body)
    write_section("dst-overhead", body)


if __name__ == "__main__":
    main()
