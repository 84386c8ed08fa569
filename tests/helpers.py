"""Small models, data and trainer settings shared by the tests (also imported by the DDP script)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "devices": 1,
}


class TinyNet(pl.LightningModule):
    """Conv1d -> BatchNorm -> Linear -> Linear on [batch, 16] inputs, 4 classes."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, **opt_kwargs: Any) -> None:
        super().__init__()
        self.optimizer_name, self.lr, self.opt_kwargs = optimizer, lr, opt_kwargs
        self.conv = nn.Conv1d(1, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.fc1 = nn.Linear(8 * 14, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x.unsqueeze(1))).relu()
        return self.fc2(self.fc1(h.flatten(1)).relu())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer_name]
        return cls(self.parameters(), lr=self.lr, **self.opt_kwargs)


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def flop_seconds(call, device, repeats, scale: float = 1e-9) -> float:
    """A deterministic stand-in for the latency table's timer: ``scale`` x the FLOPs ``call`` runs, plus 1 us."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return scale * counter.get_total_flops() + 1e-6
