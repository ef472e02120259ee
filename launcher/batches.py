"""What a batch is, how it goes through the model, and its loss.

A batch is an `(inputs, targets)` pair (the built-in datasets, most hand-written ones), or a mapping of named
tensors (`input_ids`, `attention_mask`, `labels`: the Hugging Face way), which the model takes as keyword
arguments. A model given `labels` computes its own loss (`output.loss`); a recipe without a `loss` section uses
it, and cross-entropy otherwise. Labels of a causal language model are its inputs, unshifted: the model shifts
them, and so does `sequence_pair` wherever the launcher computes a loss from the logits itself (evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from launcher.losses import classifies

IGNORE_INDEX = -100  # a label no loss counts (padding), as torch's cross-entropy and Hugging Face models agree


def split(batch: Any) -> tuple[Any, Any]:
    """`(inputs, targets)`: a pair as it is; a mapping as itself and its `labels`."""
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    inputs, targets = batch
    return inputs, targets


def forward(model: torch.nn.Module, inputs: Any) -> Any:
    """The model's output: a mapping of inputs goes in as keyword arguments."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def head_loss(model: torch.nn.Module, inputs: Any, targets: Any, reduction: str = "mean") -> Any:
    """The loss a model computes with its chunked head (`train.chunked_loss`, launcher/chunked_loss.py): given the
    targets (a mapping's `labels`, which it holds already), the model returns their mean cross-entropy, or with
    `reduction="none"` each token's loss, whether it was predicted, and whether it counts."""
    if isinstance(inputs, Mapping):
        return model(**inputs, reduction=reduction)
    return model(inputs, targets=targets, reduction=reduction)


def micro_batch_loss(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module | None,
    inputs: Any,
    targets: Any,
    chunked: bool = False,
    loss_region: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> torch.Tensor:
    """The loss a micro-batch trains on: the chunked head's (`chunked`), else `batch_loss` of the model's output,
    computed inside `loss_region` (an autocast region of the loss's own: see launcher/precision.py)."""
    if chunked:
        return head_loss(model, inputs, targets)
    output = forward(model, inputs)
    with loss_region():
        return batch_loss(loss_fn, inputs, output, targets)


def logits(output: Any) -> torch.Tensor:
    """The prediction in a model's output: a tensor, or a Hugging Face output's `logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits


def samples(inputs: Any, targets: Any) -> int:
    """The samples in a batch."""
    if targets is not None:
        return len(targets)
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return len(first)


def sequence_pair(inputs: Any, prediction: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and targets aligned: a mapping batch's sequence labels are its inputs (a causal language model's
    convention), so position t predicts label t+1."""
    if isinstance(inputs, Mapping) and prediction.dim() == 3 and targets.dim() == 2:
        return prediction[:, :-1], targets[:, 1:]
    return prediction, targets


def compute_loss(loss_fn: torch.nn.Module, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of a batch; sequence outputs (batch, time, classes) with integer targets are flattened."""
    if output.dim() > 2 and targets.dim() == output.dim() - 1 and not targets.is_floating_point():
        return loss_fn(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return loss_fn(output, targets)


def batch_loss(loss_fn: torch.nn.Module | None, inputs: Any, output: Any, targets: Any) -> torch.Tensor:
    """The loss to train on: the model's own (`loss_fn` None, and the output carries one), else `loss_fn`'s."""
    own = getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else None
    if loss_fn is None and own is not None:
        return own
    fn = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
    prediction, targets = sequence_pair(inputs, logits(output), targets)
    return compute_loss(fn, prediction, targets)


def per_sample(
    loss_fn: torch.nn.Module, inputs: Any, output: Any, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's mean loss over its positions, and (for cross-entropy) its accuracy; `loss_fn` reduces with
    `none`. In a mapping batch, labels equal to the loss's `ignore_index` (padding) count in neither."""
    prediction, targets = sequence_pair(inputs, logits(output), targets)
    batch = len(targets)
    losses = compute_loss(loss_fn, prediction, targets).float().reshape(batch, -1)
    classify = classifies(loss_fn)
    right = (prediction.argmax(dim=-1) == targets).float().reshape(batch, -1) if classify else None
    if not (classify and isinstance(inputs, Mapping)):
        return losses.mean(dim=1), None if right is None else right.mean(dim=1)
    counted = (targets != getattr(loss_fn, "ignore_index", IGNORE_INDEX)).float().reshape(batch, -1)
    return per_sample_of_tokens(inputs, losses * counted, right * counted, counted)


def per_sample_of_tokens(
    inputs: Any, losses: torch.Tensor, right: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean loss and accuracy from per-token values (batch, time), 0 where a label does not count:
    a mapping batch's averaged over the labels that count, a pair's over every position (the chunked head's
    evaluation, and `per_sample`'s)."""
    if not isinstance(inputs, Mapping):
        return losses.mean(dim=1), right.mean(dim=1)
    per_position = counted.sum(dim=1).clamp(min=1)
    return losses.sum(dim=1) / per_position, right.sum(dim=1) / per_position


def weights(inputs: Any, targets: Any, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """How much each sample's mean loss weighs in a token-weighted mean: a mapping batch of sequence labels, the
    labels that count (after the shift: a causal LM's last position predicts nothing); 1 for any other sample,
    whose positions (if any) all count alike."""
    if isinstance(inputs, Mapping) and isinstance(targets, torch.Tensor) and sequence_tokens(targets):
        return (targets[:, 1:] != ignore_index).sum(dim=1).float()
    return torch.ones(samples(inputs, targets))


def sequence_tokens(targets: Any) -> int:
    """Tokens in a batch of sequence targets (batch, time); 0 for one target per sample."""
    if not isinstance(targets, torch.Tensor):
        return 0
    return targets.numel() if targets.dim() >= 2 and not targets.is_floating_point() else 0


def token_inputs(inputs: Any) -> Any:
    """The token ids of a batch's inputs (a mapping's `input_ids`), what FLOP formulas count."""
    return inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
