"""MNIST-1D (Greydanus 2020), generated locally with ``mnist1d.data.make_dataset`` and cached as ``.npz``.

The data set is never downloaded: it is produced procedurally from the package's templates with a fixed seed
(the package's defaults: 5000 samples, 4000 train / 1000 test, 40 time steps).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

from sparse_lightning.core.errors import ConfigError


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_LIGHTNING_CACHE", Path.home() / ".cache" / "sparse_lightning"))


def mnist1d_arrays(
    num_samples: int = 5000, seed: int = 42, cache_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
    """``x``, ``y``, ``x_test``, ``y_test`` arrays of MNIST-1D, generated once and cached on disk.

    The global ``random`` and NumPy generators that ``make_dataset`` reseeds are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    settings = {k: v for k, v in vars(args).items() if k != "url"}
    key = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"mnist1d-{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in ("x", "y", "x_test", "y_test")}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D as a ``LightningDataModule``: ``[batch, 40]`` float signals, labels 0-9.

    Args:
        batch_size: samples per batch (the paper uses 100).
        val_fraction: fraction of the 4000 training samples held out for validation (0 uses the test set).
        num_samples: samples generated in all (80% train, 20% test).
        seed: generator seed of the data set (and of the validation split).
        data_dir: cache folder (default ``$SPARSE_LIGHTNING_CACHE`` or ``~/.cache/sparse_lightning``).
        num_workers: ``DataLoader`` workers.
    """

    def __init__(
        self,
        batch_size: int = 100,
        val_fraction: float = 0.1,
        num_samples: int = 5000,
        seed: int = 42,
        data_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"`val_fraction` must lie in [0, 1), got {val_fraction!r}.")
        if not isinstance(num_samples, int) or num_samples < 10:
            raise ConfigError(f"`num_samples` must be an int >= 10, got {num_samples!r}.")
        self.save_hyperparameters()
        self.batch_size, self.val_fraction, self.num_samples = batch_size, val_fraction, num_samples
        self.seed, self.data_dir, self.num_workers = seed, data_dir, num_workers

    def prepare_data(self) -> None:
        mnist1d_arrays(self.num_samples, self.seed, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        arrays = mnist1d_arrays(self.num_samples, self.seed, self.data_dir)

        def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))

        train, self.test_set = dataset(arrays["x"], arrays["y"]), dataset(arrays["x_test"], arrays["y_test"])
        n_val = int(round(self.val_fraction * len(train)))
        if n_val:
            generator = torch.Generator().manual_seed(self.seed)
            self.train_set, self.val_set = random_split(train, [len(train) - n_val, n_val], generator=generator)
        else:
            self.train_set, self.val_set = train, self.test_set

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000, num_workers=self.num_workers)
