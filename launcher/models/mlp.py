"""A multi-layer perceptron for classification or regression on feature vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from launcher.components import fraction_problem, integer_problem


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

    @staticmethod
    def check_args(args: Mapping[str, Any], data: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(argument, problem) pairs for what would fail in training; `args` are the arguments the model gets
        (defaults filled in), `data` what the train set tells the model. Pure: run before anything is built."""
        checks = [(name, integer_problem(args[name], 1)) for name in ("in_features", "num_classes") if name in args]
        checks += [("hidden_sizes", integer_problem(size, 1)) for size in args.get("hidden_sizes", ())]
        checks.append(("dropout", fraction_problem(args.get("dropout", 0.0))))
        found = [(name, problem) for name, problem in checks if problem]
        if found:
            return found
        # The recipe's values win over the data's: ones that cannot work with the data fail at the first batch.
        given, told = args.get("in_features"), data.get("in_features")
        if told is not None and given != told:
            found.append(("in_features", f"is {given}, but the data has {told} features"))
        given, told = args.get("num_classes", 0), data.get("num_classes")
        if told is not None and given < told:
            found.append(("num_classes", f"is {given}, less than the data's {told} classes"))
        return found
