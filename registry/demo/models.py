"""Example ``nn.Module`` classes served by the demo registry.

They are ordinary PyTorch classes: moduleserve imports them by path
(``moduleserve.registry.demo.models:MyNet``) and builds them with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MyNet(nn.Module):
    """The classic tutorial network: Conv2d(3, 16, 3) -> flatten -> Linear(16*6*6, 10).

    Input: float32 images of shape [N, 3, 8, 8].
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        out: torch.Tensor = self.fc(torch.flatten(x, 1))
        return out


class Block(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, keeping the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.bn(self.conv(x)))
        return out


class Net(nn.Module):
    """Two nested ``Block``s and a linear head: submodules inside submodules.

    The textbook version feeds block1's 16 channels into a block2 built for 3
    channels and fails at run time; here block2 takes block1's output.
    Input: float32 images of shape [N, 3, 8, 8].
    """

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = Block(3, channels)
        self.block2 = Block(channels, channels * 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        out: torch.Tensor = self.head(torch.flatten(self.pool(x), 1))
        return out


class MLP(nn.Module):
    """Linear layers with BatchNorm1d, ReLU and Dropout: train() and eval() differ.

    Input: float32 vectors of shape [N, in_features].
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (128,),
        out_features: int = 10,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class FrozenBackboneNet(nn.Module):
    """A backbone frozen in ``__init__`` under a trainable head (for fine-tuning).

    Input: float32 vectors of shape [N, in_features].
    """

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, out_features)
        for param in self.backbone.parameters():
            param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


class TiedAutoencoder(nn.Module):
    """An autoencoder whose decoder weight is the encoder weight (tied weights).

    Input: float32 vectors of shape [N, features].
    """

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, features, bias=False)
        self.decoder = nn.Linear(features, features, bias=False)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(torch.tanh(self.encoder(x)))
        return out


class TwoInputNet(nn.Module):
    """A model whose ``forward`` takes two named inputs: ``a`` [N, 4] and ``b`` [N, 4]."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.proj_a = nn.Linear(features, 2)
        self.proj_b = nn.Linear(features, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj_a(a) + self.proj_b(b)
        return out
