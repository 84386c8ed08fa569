"""Train the MNIST-1D paper's CNN with gradual magnitude pruning to 90% sparsity.

    python examples/gradual_magnitude_mnist1d.py [--epochs 60] [--sparsity 0.9] [--channels 25] [--seed 0]

Prints the test accuracy and the sparsity that the trained weights really have.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from sparse_lightning import GradualMagnitudePruning, masks_of
from sparse_lightning.data import MNIST1DDataModule
from sparse_lightning.models import MNIST1DCNN


def main() -> None:
    parser = argparse.ArgumentParser(description="Gradual magnitude pruning of the MNIST-1D CNN.")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--channels", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    model = MNIST1DCNN(channels=args.channels)
    pruning = GradualMagnitudePruning(sparsity=args.sparsity, start=0.1, end=0.6, every=20, distribution="global")
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False)
    data = MNIST1DDataModule()
    trainer.fit(model, datamodule=data)
    test_acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]

    params = dict(model.named_parameters())
    masks = masks_of(model)
    zeros = sum(int((params[name] == 0).sum()) for name in masks)
    total = sum(params[name].numel() for name in masks)
    print(f"test accuracy: {test_acc:.4f}")
    print(f"sparsity of the pruned weights: {zeros / total:.4f} ({zeros} of {total} are exactly zero)")


if __name__ == "__main__":
    main()
