from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

from helpers import TinyNet, tiny_loader  # noqa: E402


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def loader():
    return tiny_loader()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPARSE_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """Each test that starts a W&B run gets a fresh W&B service: a second offline run in one process otherwise
    wrote no ``run-*.wandb`` file."""
    yield
    if "wandb" in sys.modules:
        import wandb

        wandb.finish()
        wandb.teardown()
