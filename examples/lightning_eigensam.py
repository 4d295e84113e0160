"""Eigen-SAM in a Lightning module (manual optimization, ``self.manual_backward``).

    pip install 'eigensam[lightning]'
    python examples/lightning_eigensam.py [--epochs 3]

SAM-type optimizers need the loss twice per step (and more on eigenvector refreshes), so the
module turns automatic optimization off and hands a closure to the optimizer: the closure
computes the loss and calls ``self.manual_backward``; ``optimizer.step(closure=...)`` runs both
passes. The optimizer is given the LightningModule itself, so its BatchNorm statistics are
protected in the second pass and in the Hessian-vector products. For several GPUs, use the plain
PyTorch DDP pattern of ``examples/ddp_train.py`` (the optimizer needs the DDP wrapper).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eigensam import EigenSAM


def synthetic_data(n: int = 2048, dim: int = 20, classes: int = 10) -> TensorDataset:
    """Inputs from N(0, I), labels from a fixed random linear teacher plus noise (seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


class EigenSAMClassifier(L.LightningModule):
    """A small BatchNorm MLP trained with Eigen-SAM (paper Eq. 7-8) around SGD."""

    def __init__(self, lr: float = 0.1, rho: float = 0.05, alpha: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = nn.Sequential(
            nn.Linear(20, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return EigenSAM(
            self,
            torch.optim.SGD,
            rho=hp.rho,
            alpha=hp.alpha,
            eig_interval=10,
            eig_iters=5,
            lr=hp.lr,
            momentum=0.9,
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure=closure)
        self.log("train_loss", loss.detach(), prog_bar=True)
        self.log("lambda_max", optimizer.optimizer.tracker.eigenvalue or 0.0)


def train(epochs: int = 3, limit_train_batches: int | float = 1.0) -> EigenSAMClassifier:
    """Fit the classifier on the CPU; return it."""
    torch.manual_seed(0)
    model = EigenSAMClassifier()
    loader = DataLoader(synthetic_data(), batch_size=64, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        limit_train_batches=limit_train_batches,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Eigen-SAM in Lightning")
    parser.add_argument("--epochs", type=int, default=3)
    train(parser.parse_args().epochs)
