from sparse_lightning.data.images import ImageFolderDataModule
from sparse_lightning.data.mnist1d import MNIST1DDataModule, mnist1d_arrays

__all__ = ["ImageFolderDataModule", "MNIST1DDataModule", "mnist1d_arrays"]
