"""The reference models of the MNIST-1D paper (Greydanus 2020), as ``LightningModule``s.

The CNN: three 1-D convolutions (kernel 5/3/3, stride 2, padding 1, ReLU) and a linear read-out; with the paper's
25 channels it has about 5k weights. ``channels=128`` gives the wide variant. The MLP: 40 -> 100 -> 100 -> 10.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lightning.core.errors import ConfigError
from sparse_lightning.models.classifier import LitClassifier


class ConvNet1D(nn.Module):
    def __init__(self, channels: int = 25, length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(-1, 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class MLP1D(nn.Module):
    def __init__(self, hidden: int = 100, length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.linear1 = nn.Linear(length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x.flatten(1)).relu()
        h = self.linear2(h).relu()
        return self.linear3(h)


class MNIST1DCNN(LitClassifier):
    """The MNIST-1D paper's CNN (``channels=25``) or its wide variant (``channels=128``), Adam at 1e-2."""

    def __init__(
        self,
        channels: int = 25,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
        lr_schedule: str = "constant",
    ) -> None:
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"`channels` must be a positive int, got {channels!r}.")
        super().__init__(ConvNet1D(channels), 10, lr, weight_decay, optimizer, momentum, lr_schedule)
        self.save_hyperparameters()
        self.example_input_array = torch.zeros(1, 40)


class MNIST1DMLP(LitClassifier):
    """The MNIST-1D paper's MLP (40 -> ``hidden`` -> ``hidden`` -> 10), Adam at 1e-2."""

    def __init__(
        self,
        hidden: int = 100,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
        lr_schedule: str = "constant",
    ) -> None:
        if not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"`hidden` must be a positive int, got {hidden!r}.")
        super().__init__(MLP1D(hidden), 10, lr, weight_decay, optimizer, momentum, lr_schedule)
        self.save_hyperparameters()
        self.example_input_array = torch.zeros(1, 40)
