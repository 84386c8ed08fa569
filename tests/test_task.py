import random

import numpy as np
import pytest
import torch

from sparse_lightning.data import MNIST1DDataModule, mnist1d_arrays
from sparse_lightning.models import MNIST1DCNN, MNIST1DMLP, torchvision_classifier


def test_mnist1d_is_generated_cached_and_leaves_global_rngs_alone(tmp_path):
    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    arrays = mnist1d_arrays(num_samples=200, seed=3, cache_dir=tmp_path)
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    assert arrays["x"].shape == (160, 40) and arrays["x_test"].shape == (40, 40)
    assert set(np.unique(arrays["y"])) <= set(range(10))
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = mnist1d_arrays(num_samples=200, seed=3, cache_dir=tmp_path)
    assert np.array_equal(arrays["x"], again["x"])
    other = mnist1d_arrays(num_samples=200, seed=4, cache_dir=tmp_path)
    assert not np.array_equal(arrays["x"], other["x"])


def test_datamodule_splits_and_batches(tmp_path):
    dm = MNIST1DDataModule(batch_size=16, num_samples=200, data_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 144 and len(dm.val_set) == 16 and len(dm.test_set) == 40
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 40) and x.dtype == torch.float32 and y.dtype == torch.long


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "`batch_size`"), ({"val_fraction": 1.0}, "`val")])
def test_datamodule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNIST1DDataModule(**kwargs)


def test_reference_models():
    cnn = MNIST1DCNN()
    weights = sum(p.numel() for n, p in cnn.named_parameters() if n.endswith("weight"))
    assert weights == 5125  # 25*5 + 2 * 25*25*3 + 125*10
    assert cnn(torch.randn(3, 40)).shape == (3, 10)
    assert MNIST1DCNN(channels=128)(torch.randn(2, 40)).shape == (2, 10)
    assert MNIST1DMLP()(torch.randn(2, 40)).shape == (2, 10)


def test_torchvision_wrapper():
    model = torchvision_classifier("resnet18", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="Unknown torchvision classification model 'resnet7'"):
        torchvision_classifier("resnet7")


@pytest.mark.parametrize("model_cls", [MNIST1DCNN, MNIST1DMLP])
def test_reference_models_build_sgd_with_momentum(model_cls):
    optimizer = model_cls(optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=1e-4).configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.5, 1e-4)


def test_cosine_schedule_anneals_to_zero_over_training():
    import lightning.pytorch as pl
    from helpers import QUIET, tiny_loader

    class Tiny(MNIST1DMLP):
        def forward(self, x):
            return super().forward(torch.nn.functional.pad(x, (0, 24)))

    model = Tiny(hidden=8, optimizer="sgd", lr=0.1, lr_schedule="cosine")
    trainer = pl.Trainer(max_epochs=2, **QUIET)
    trainer.fit(model, tiny_loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"`lr_schedule` must be one of \['constant', 'cosine'\]"):
        MNIST1DCNN(lr_schedule="step")
