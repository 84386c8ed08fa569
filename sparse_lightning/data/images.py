"""Image classification from a folder of class subfolders (torchvision ``ImageFolder``), for any torchvision model."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from sparse_lightning.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(pl.LightningDataModule):
    """Images in ``root/<class>/<image>`` (or ``root/train``, ``root/val``, ``root/test`` holding such folders).

    Training images get torchvision's standard augmentation (``RandomResizedCrop(image_size)``, horizontal flips),
    evaluation images a resize to ``image_size * 8 / 7`` and a center crop; both are normalized with the ImageNet
    mean and standard deviation. Without ``root/train``, a seeded ``val_fraction`` of ``root`` is held out for
    validation (with the evaluation transform); the test set is ``root/test`` if present, else the validation set.

    Args:
        root: the folder.
        image_size: side of the square crops.
        batch_size: samples per batch.
        val_fraction: share of ``root`` held out when it has no ``train``/``val`` split, in [0, 1).
        seed: seed of that split.
        num_workers: ``DataLoader`` workers.

    Example (``--model sparse_lightning.models.ImageClassifier --model.arch resnet18 --model.num_classes 10``)::

        sparse-lightning fit --recipe gmp-90 --data sparse_lightning.data.ImageFolderDataModule --data.root ./images
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive int, got {value!r}.")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ConfigError(f"`val_fraction` must lie in [0, 1), got {val_fraction!r}.")
        if not Path(root).is_dir():
            raise ConfigError(f"`root` {str(root)!r} is not a folder of class subfolders.")
        self.save_hyperparameters()
        self.root, self.image_size, self.batch_size = Path(root), image_size, batch_size
        self.val_fraction, self.seed, self.num_workers = float(val_fraction), seed, num_workers

    def transforms(self, train: bool):
        from torchvision import transforms as T

        if train:
            steps = [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(round(self.image_size * 8 / 7)), T.CenterCrop(self.image_size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def _folder(self, path: Path, train: bool):
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(str(path), transform=self.transforms(train))
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"`root` {str(path)!r}: {err}") from None

    def setup(self, stage: str | None = None) -> None:
        if (self.root / "train").is_dir():
            self.train_set = self._folder(self.root / "train", train=True)
            val_dir = self.root / "val"
            self.val_set = self._folder(val_dir, train=False) if val_dir.is_dir() else None
        else:
            train, evaluation = self._folder(self.root, train=True), self._folder(self.root, train=False)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = round(self.val_fraction * len(train))
            self.train_set, self.val_set = Subset(train, order[n_val:]), Subset(evaluation, order[:n_val])
            if not n_val:
                self.val_set = None
        test_dir = self.root / "test"
        self.test_set = self._folder(test_dir, train=False) if test_dir.is_dir() else self.val_set

    @property
    def num_classes(self) -> int:
        folder = self.train_set.dataset if isinstance(self.train_set, Subset) else self.train_set
        return len(folder.classes)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_set, shuffle=False) if self.test_set is not None else []
