"""The recipe's `loss`, built: a loss module (`torch.nn.CrossEntropyLoss`, a user's class), a loss function of
(outputs, targets) such as `torch.nn.functional.cross_entropy`, or a function that makes either.

A function whose first two parameters are required and not given by the recipe is the loss itself: it is wrapped
in a module with the recipe's arguments bound, so that the loop, evaluation and checkpoints see one kind of loss.
Any other function is called to make the loss. What comes out must be callable. The same building serves
`launcher validate` and training, so they agree on what they refuse.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from launcher import components
from launcher.components import Component
from launcher.errors import RecipeError


class FunctionLoss(torch.nn.Module):
    """A loss function as a module, its recipe arguments bound. Where the function takes `reduction`, it is an
    attribute, as on torch's loss modules, so that evaluation can ask for one loss per sample."""

    def __init__(self, fn: Callable[..., torch.Tensor], kwargs: Mapping[str, Any]):
        super().__init__()
        self.fn, self.kwargs = fn, dict(kwargs)
        if components.accepts(fn, "reduction"):
            self.reduction = self.kwargs.pop("reduction", "mean")

    def forward(self, outputs: Any, targets: Any) -> torch.Tensor:
        reduction = {"reduction": self.reduction} if hasattr(self, "reduction") else {}
        return self.fn(outputs, targets, **self.kwargs, **reduction)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', '?')}"


def is_loss_function(fn: Any, given: Mapping[str, Any]) -> bool:
    """A function (not a class) whose first two parameters are required and not among the recipe's arguments:
    it takes the outputs and the targets."""
    if inspect.isclass(fn):
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) >= 2 and not any(p.name in given for p in required[:2])


def build(spec: Component) -> torch.nn.Module:
    """The loss a recipe names, or RecipeError with the line `launcher validate` and training both give."""
    fn = components.resolve("loss", spec.target)
    if is_loss_function(fn, spec.kwargs):
        problems = components.argument_problems(fn, spec.kwargs, passed=_first_two(fn))
        if problems:
            raise RecipeError([f"loss.{arg}: {message}" for arg, message in problems])
        return FunctionLoss(fn, spec.kwargs)
    loss = components.instantiate("loss", spec)
    if not callable(loss):
        raise RecipeError(
            f"loss: {spec.target} gave a {type(loss).__name__}, not a loss; name a loss module "
            "(torch.nn.CrossEntropyLoss), a function of (outputs, targets) or a function that returns one of those"
        )
    return loss


def _first_two(fn: Any) -> tuple[str, ...]:
    return tuple(list(inspect.signature(fn).parameters)[:2])


def classifies(loss_fn: Any) -> bool:
    """Whether the loss takes class indices as cross-entropy does: evaluation then also scores accuracy."""
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):
        return True
    return isinstance(loss_fn, FunctionLoss) and loss_fn.fn is torch.nn.functional.cross_entropy


def takes_float_targets(loss_fn: Any) -> bool:
    """Whether the loss compares the output with float targets of its shape (class indices do not fit it)."""
    from torch import nn
    from torch.nn import functional as F

    modules = (
        nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss, nn.KLDivLoss,
        nn.SoftMarginLoss, nn.PoissonNLLLoss, nn.MultiLabelSoftMarginLoss,
    )  # fmt: skip
    functions = (
        F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
        F.binary_cross_entropy_with_logits, F.kl_div, F.soft_margin_loss, F.poisson_nll_loss,
        F.multilabel_soft_margin_loss,
    )  # fmt: skip
    return isinstance(loss_fn, modules) or getattr(loss_fn, "fn", None) in functions


def evaluation_metrics(spec: Component | None) -> tuple[str, ...] | None:
    """The metrics an evaluation produces with this loss (`evaluation.evaluate`): val/loss, and val/accuracy for
    cross-entropy (or no loss: a model's own loss is scored by cross-entropy). None where that is not known
    without building the loss (a function that makes one)."""
    if spec is None:
        return ("val/accuracy", "val/loss")
    try:
        fn = components.resolve("loss", spec.target)
    except components.ResolveError:
        return None
    if is_loss_function(fn, spec.kwargs):
        return ("val/accuracy", "val/loss") if fn is torch.nn.functional.cross_entropy else ("val/loss",)
    if not inspect.isclass(fn):
        return None
    return ("val/accuracy", "val/loss") if issubclass(fn, torch.nn.CrossEntropyLoss) else ("val/loss",)
