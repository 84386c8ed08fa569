"""The image-folder data module, on a small generated folder, and a torchvision model through the command."""

import pytest
import torch
from PIL import Image

from sparse_lightning.cli import main
from sparse_lightning.data import ImageFolderDataModule


@pytest.fixture
def image_folder(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for label, shade in (("cat", 40), ("dog", 200)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            pixels = (shade + 30 * torch.rand(24, 24, 3, generator=generator)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / label / f"{i}.png")
    return tmp_path / "images"


def test_split_transforms_and_batches(image_folder):
    data = ImageFolderDataModule(str(image_folder), image_size=16, batch_size=4, val_fraction=0.2)
    data.setup("fit")
    assert data.num_classes == 2
    assert (len(data.train_set), len(data.val_set)) == (16, 4)
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.long
    x_val, _ = next(iter(data.val_dataloader()))
    again, _ = next(iter(data.val_dataloader()))
    assert torch.equal(x_val, again), "evaluation images are not augmented"
    assert len(data.test_set) == 4  # no test folder: the validation images


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"root": "no/such/folder"}, "is not a folder"), ({"image_size": 0}, "`image_size` must be a positive int")],
)
def test_bad_input(image_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(**{"root": str(image_folder), **kwargs})


def test_a_torchvision_model_trains_from_the_command(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--recipe",
        "gmp-90-global",
        "--model",
        "sparse_lightning.models.ImageClassifier",
        "--model.arch",
        "resnet18",
        "--model.num_classes",
        "2",
        "--data",
        "sparse_lightning.data.ImageFolderDataModule",
        "--data.root",
        str(image_folder),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "4",
        "--trainer.max_epochs",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sparsity (masked)      0.9000" in out and "net.fc.weight" in out and "test/acc" in out
