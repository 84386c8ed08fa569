from sparse_lightning.data.mnist1d import MNIST1DDataModule, mnist1d_arrays

__all__ = ["MNIST1DDataModule", "mnist1d_arrays"]
