"""A ``LightningModule`` around any classification network: cross-entropy, Adam or SGD, torchmetrics accuracy."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn

from sparse_lightning.core.errors import ConfigError, check_choice

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


class LitClassifier(pl.LightningModule):
    """Train ``net`` (inputs -> logits) for ``num_classes``; logs ``train/loss``, ``val/acc``, ``test/acc``.

    Args:
        net: the network; its parameters are named ``net.<...>``.
        num_classes: number of classes.
        lr, weight_decay, momentum: optimizer settings.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr_schedule: ``constant``, or ``cosine`` (annealed to 0 over the optimizer steps of training).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        if lr <= 0:
            raise ConfigError(f"`lr` must be positive, got {lr}.")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Any, metric: torchmetrics.Metric, stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            opt = cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.get("lr_schedule", "constant") == "constant":
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ImageClassifier(LitClassifier):
    """A torchvision classification model by name, e.g. ``ImageClassifier("resnet18", num_classes=10)``.

    Weights are never downloaded (``weights=None``); extra keyword arguments go to the torchvision builder.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        lr_schedule: str = "constant",
        **model_kwargs: Any,
    ) -> None:
        net = torchvision_net(arch, num_classes, **model_kwargs)
        super().__init__(net, num_classes, lr, weight_decay, optimizer, momentum, lr_schedule)
        self.save_hyperparameters()


def torchvision_net(arch: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ConfigError(f"Unknown torchvision classification model {arch!r}. Available: {sorted(available)}.")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def torchvision_classifier(arch: str, num_classes: int = 10, **kwargs: Any) -> ImageClassifier:
    """Wrap a torchvision classification model as a :class:`LitClassifier` (no weights are downloaded)."""
    return ImageClassifier(arch, num_classes, **kwargs)
