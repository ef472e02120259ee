"""A multi-layer perceptron for classification or regression on feature vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (128, 128),
        dropout: float = 0.0,
        activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu",
    ):
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}[activation]
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), act(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
