"""A deterministic synthetic classification set: the embedded default, with nothing to download.

Each class is a mixture of Gaussian clusters in feature space, so a linear model cannot separate the classes but a
small MLP can. The same `seed` always gives the same clusters; train and val draw different samples from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from launcher.components import SEED_LIMIT, describe, integer_problem, number_problem
from launcher.data import DataFacts

_SPLIT_OFFSET = {"train": 1, "val": 2, "test": 3}


class SyntheticClassification(Dataset):
    def __init__(
        self,
        split: str = "train",
        num_samples: int = 8192,
        num_features: int = 32,
        num_classes: int = 4,
        clusters_per_class: int = 3,
        noise: float = 1.6,
        separation: float = 1.0,
        seed: int = 0,
    ):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        if min(num_samples, num_features, num_classes, clusters_per_class) < 1:
            raise ValueError("num_samples, num_features, num_classes and clusters_per_class must be >= 1")
        centers_rng = torch.Generator().manual_seed(seed)
        centers = torch.randn(num_classes * clusters_per_class, num_features, generator=centers_rng) * separation
        rng = torch.Generator().manual_seed(seed * 10 + _SPLIT_OFFSET[split])
        cluster = torch.randint(0, len(centers), (num_samples,), generator=rng)
        self.x = centers[cluster] + noise * torch.randn(num_samples, num_features, generator=rng)
        # Clusters are dealt to classes round-robin, so each class owns clusters far apart from each other.
        self.y = cluster % num_classes
        self.model_kwargs = {"in_features": num_features, "num_classes": num_classes}

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(argument, problem) pairs for what the constructor would refuse; `args` with defaults filled in."""
        checks = [
            (name, integer_problem(args.get(name), 1))
            for name in ("num_samples", "num_features", "num_classes", "clusters_per_class")
        ]
        checks += [(name, number_problem(args.get(name))) for name in ("noise", "separation")]
        checks.append(("seed", integer_problem(args.get("seed"), 0, SEED_LIMIT - 1)))
        if args.get("split") not in _SPLIT_OFFSET:
            checks.append(("split", f"expected one of: {', '.join(_SPLIT_OFFSET)}; got {describe(args.get('split'))}"))
        return [(name, problem) for name, problem in checks if problem]

    @staticmethod
    def facts(args: Mapping[str, Any]) -> DataFacts:
        """What the set holds, from its (checked) arguments alone."""
        n, features, classes = args["num_samples"], args["num_features"], args["num_classes"]
        centers = classes * args["clusters_per_class"] * features
        return DataFacts(
            model_kwargs={"in_features": features, "num_classes": classes},
            samples=n,
            tensor_bytes=4 * (n * features + centers) + 8 * n,  # float32 samples and centers, int64 labels
        )
