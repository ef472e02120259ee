"""Built-in datasets. Each takes `split` ("train" or "val") and yields (input, target) pairs; `model_kwargs`
tells the model what it needs to know of the data (vocab_size, num_classes, ...).

Each also has a pure `check_args(args)` giving (argument, problem) pairs, run when a recipe is validated; one whose
arguments alone tell what it holds has `facts(args)` too, so validation need not build it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataFacts:
    """What validation knows of a dataset before training builds it."""

    model_kwargs: dict[str, Any] = field(default_factory=dict)  # what it tells the model
    samples: int | None = 0  # None: not known before it is built (a tokenized set) or ever (a stream)
    tensor_bytes: int = 0  # the memory its tensors take
