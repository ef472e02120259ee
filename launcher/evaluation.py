"""Evaluation and what watches its metrics: the best checkpoints and early stopping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from launcher import batches, consensus
from launcher.build import Parts
from launcher.checkpoint import rank_best
from launcher.errors import RecipeError
from launcher.losses import classifies
from launcher.metrics import Throughput
from launcher.precision import Precision
from launcher.recipe import Recipe
from launcher.trainstate import TrainState

MAX_EXPONENT = 700.0  # e to more overflows a float: the perplexity is then infinite (logged as null)


class Evaluator:
    """Evaluates when due, logs the metrics, keeps the best checkpoints' ranking and the early-stopping tracker
    (both in the train state), and keeps the last metrics for the checkpoint's monitor and the run's summary."""

    def __init__(
        self, accelerator: Accelerator, recipe: Recipe, parts: Parts, state: TrainState, throughput: Throughput
    ):
        self.accelerator, self.recipe, self.state, self.throughput = accelerator, recipe, state, throughput
        self.model, self.loader, self.loss_fn = parts.model, parts.val_loader, parts.loss_fn
        self.precision, self.chunked, self.gather = parts.precision, parts.chunked, parts.gather
        self.last: dict[str, float] = {}
        self.last_step = -1

    def due_at_step(self, step: int) -> bool:
        every = self.recipe.eval.every_steps
        return self.loader is not None and bool(every) and step % every == 0

    def due_at_epoch_end(self, step: int) -> bool:
        return self.loader is not None and self.recipe.eval.every_epoch and self.last_step != step

    def due_at_end(self, step: int) -> bool:
        return self.loader is not None and self.last_step != step

    def monitored(self, step: int) -> float | None:
        """The checkpoint's monitored metric at `step`, if the run evaluated there."""
        return self.last.get(self.recipe.checkpoint.monitor) if self.last_step == step else None

    def run(
        self, log: Callable[[dict[str, float]], None], save: Callable[[], None], say: Callable[[str], None]
    ) -> bool:
        """Evaluate, log, keep the best checkpoint (saving this step if it is one); True when early stopping says
        stop (the same on every rank)."""
        assert self.loader is not None
        step = self.state.step
        with self.throughput.paused():
            self.last = evaluate(
                self.accelerator, self.model, self.loader, self.loss_fn, self.recipe.eval.max_batches,
                self.precision, self.chunked, self.gather,
            )  # fmt: skip
        self.last_step = step
        log(self.last)
        if self.accelerator.is_main_process:
            say(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in self.last.items()))
        ckpt = self.recipe.checkpoint
        if ckpt.keep_best:
            # Every rank ranks the same global metric, so all agree whether this state is worth a checkpoint.
            value = metric(self.last, ckpt.monitor, "checkpoint.monitor")
            self.state.best_checkpoints = rank_best(self.state.best_checkpoints, step, value, ckpt.keep_best, ckpt.mode)
            if any(best == step for best, _ in self.state.best_checkpoints):
                save()  # (again, if this step was saved before its evaluation: now with its metric)
        es = self.recipe.early_stopping
        if es is None:
            return False
        value = metric(self.last, es.monitor, "early_stopping.monitor")
        self.state.early_stopping = self.state.early_stopping.update(value, step)
        # Every rank computed the same global metric; the all-reduce still makes the verdict one value.
        return consensus.any_rank(self.accelerator, self.state.early_stopping.should_stop(es.patience))

    def summary(self) -> str:
        return "  ".join(f"{k} {v:.4f}" for k, v in self.last.items())


def metric(values: dict[str, float], name: str, key: str) -> float:
    if name not in values:
        raise RecipeError(
            f"{key}: {name!r} is not a validation metric of this run (it has: {', '.join(sorted(values))})"
        )
    return values[name]


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: torch.nn.Module | None,
    max_batches: int | None,
    precision: Precision,
    chunked: bool,
    gather: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy, for classification; perplexity, for a language model) over the validation set, each
    sample counted once across all ranks: per-sample values and their weights (the labels each counts) are gathered,
    and the padding Accelerate adds to even out ranks is dropped. A model that computes its own loss (`loss_fn`
    None) is scored with cross-entropy of its logits, per sample; one with the chunked head (`chunked`) by that
    head, which never holds all the logits. Forward and loss run in the training's autocast regions
    (`precision`)."""
    loss_fn = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
    per_sample_loss_fn = copy.copy(loss_fn)
    if hasattr(per_sample_loss_fn, "reduction"):
        per_sample_loss_fn.reduction = "none"
    classify = classifies(loss_fn)
    model.eval()
    loss_total, correct_total, count, sequences = 0.0, 0.0, 0.0, False
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs, targets = batches.split(batch)
        with precision.forward():
            if chunked:
                losses, right = batches.per_sample_of_tokens(inputs, *batches.head_loss(model, inputs, targets, "none"))
            else:
                output = batches.forward(model, inputs)
                with precision.loss():
                    losses, right = score(loss_fn, per_sample_loss_fn, inputs, output, targets)
        weight = batches.weights(inputs, targets, getattr(loss_fn, "ignore_index", batches.IGNORE_INDEX))
        sequences = sequences or batches.sequence_tokens(targets) > 0
        values = [losses, weight.to(losses.device)] + ([] if right is None else [right])
        gathered = (gather or accelerator.gather_for_metrics)(values)
        loss_total += (gathered[0] * gathered[1]).sum().item()
        count += gathered[1].sum().item()
        if classify and right is not None:
            correct_total += (gathered[2] * gathered[1]).sum().item()
    model.train()
    return results(loss_total, correct_total, count, classify, sequences)


def results(loss_total: float, correct_total: float, count: float, classify: bool, sequences: bool) -> dict[str, float]:
    """The metrics of an evaluation from its token-weighted totals: each counted token (or each sample, without
    sequences) weighs the same, however the batches fell. A cross-entropy over token sequences (a language model)
    also gives its perplexity, e to the mean loss."""
    loss = loss_total / max(count, 1)
    out = {"val/loss": loss}
    if classify:
        out["val/accuracy"] = correct_total / max(count, 1)
        if sequences:
            out["val/perplexity"] = math.exp(loss) if loss < MAX_EXPONENT else math.inf
    return out


def score(
    loss_fn: torch.nn.Module, per_sample_loss_fn: torch.nn.Module, inputs: Any, output: Any, targets: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's loss (and whether it was right, for classification) from the model's outputs."""
    if hasattr(per_sample_loss_fn, "reduction"):
        return batches.per_sample(per_sample_loss_fn, inputs, output, targets)
    # A loss without `reduction`: its batch mean stands for each sample of the batch.
    return batches.batch_loss(loss_fn, inputs, output, targets).float().expand(len(targets)), None
