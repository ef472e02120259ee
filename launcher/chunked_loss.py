"""A causal LM's output projection and cross-entropy in chunks of tokens (`train.chunked_loss`), so that neither
the (batch, time, vocabulary) logits nor their gradient exist at once.

For each chunk of tokens the forward pass computes the chunk's logits (in the compute precision: bf16 under
autocast), its log-sum-exp and loss in fp32, and at once the gradient of the mean loss with respect to the chunk's
hidden states and the head's weight; the logits are then dropped. Backward only scales those gradients by the
loss's incoming gradient. The matmuls are the plain loss's three (logits, input gradient, weight gradient), in the
same precision; what is kept for backward is the hidden states' gradient (tokens x width) and the weight's
(vocabulary x width, fp32), instead of logits and log-probabilities of tokens x vocabulary. Liger-Kernel's fused
linear cross-entropy does the same in Triton kernels.

The head runs as a module call (`ChunkedLinear`, an `nn.Linear` taking targets), inside the model's forward, so
that every strategy's hooks see it: FSDP2's root unshards the weight, ZeRO-3 gathers it before the call and again
before its backward, DDP's reducer sees the gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from launcher.batches import IGNORE_INDEX

CHUNK_VALUES = 2**25  # logits per chunk: 128 MiB in fp32, a few dozen chunks for a GPT-2 batch of 16 x 1024
AUTO_MIN_VOCAB = 16384  # `auto` chunks from here: below it the logits are small next to the activations


def chunk_rows(tokens: int, vocab: int) -> int:
    """Tokens per chunk: about CHUNK_VALUES logits, a multiple of 8 (aligned matmuls), at most `tokens`."""
    rows = max(8, CHUNK_VALUES // max(vocab, 1) // 8 * 8)
    return max(1, min(rows, tokens))


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The precision the logits' matmul runs in: autocast's where it is on (as `nn.Linear` would), else the
    hidden states'."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off (every dtype here is chosen explicitly); nothing where autocast does not exist (the meta
    device, on which `launcher plan` measures what backward keeps)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of `hidden @ weight.T` against `targets` over the targets that count; hidden
    (tokens, width), weight (vocabulary, width), targets (tokens,)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with no_autocast(hidden.device):
            h, w = hidden.to(dtype), weight.to(dtype)
            counted = targets != IGNORE_INDEX
            # The plain loss's division, as a tensor: the host never waits for the count.
            scale = 1.0 / counted.sum().clamp(min=1).float()
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
            rows = chunk_rows(len(h), len(w))
            for start in range(0, len(h), rows):
                part = slice(start, start + rows)
                logits = (h[part] @ w.T).float()
                losses, log_z = _token_losses(logits, targets[part], counted[part])
                total = total + losses.sum()
                if not wants_grad:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / count, zero where the target does not count.
                grad = logits.sub_(log_z.unsqueeze(1)).exp_()
                grad[torch.arange(len(grad), device=grad.device), targets[part].clamp(min=0)] -= 1.0
                grad = (grad * (counted[part].unsqueeze(1) * scale)).to(dtype)
                if grad_h is not None:
                    torch.matmul(grad, w, out=grad_h[part])
                if grad_w is not None:
                    grad_w += (grad.T @ h[part]).float()
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w)),
        )
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (grad_h * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_loss).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def _token_losses(
    logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's cross-entropy (0 where its target does not count) from fp32 logits, and the log-sum-exp."""
    log_z = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return (log_z - picked) * counted, log_z


@torch.no_grad()
def per_token(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For evaluation, chunk by chunk: each token's loss and whether its most likely prediction is the target
    (both fp32, 0 where the target does not count), and which targets count."""
    dtype = compute_dtype(hidden)
    with no_autocast(hidden.device):
        h, w = hidden.to(dtype), weight.to(dtype)
        counted = targets != IGNORE_INDEX
        losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
        right = torch.empty_like(losses)
        rows = chunk_rows(len(h), len(w))
        for start in range(0, len(h), rows):
            part = slice(start, start + rows)
            logits = (h[part] @ w.T).float()
            losses[part] = _token_losses(logits, targets[part], counted[part])[0]
            right[part] = (logits.argmax(dim=1) == targets[part]) & counted[part]
    return losses, right, counted.float()


class ChunkedLinear(nn.Linear):
    """An output projection that, given targets, returns the chunked cross-entropy instead of the logits: the
    mean over the targets that count (`reduction="mean"`), or for evaluation each token's loss, whether it was
    predicted, and whether it counts (`"none"`, each shaped like the targets). A plain `nn.Linear` otherwise, with
    the same parameters and state dict."""

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> Any:
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        if self.bias is not None:
            raise ValueError("the chunked loss takes an output projection without bias")
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if reduction == "none":
            return tuple(t.view(targets.shape) for t in per_token(flat, self.weight, flat_targets))
        return LinearCrossEntropy.apply(flat, self.weight, flat_targets, compute_dtype(hidden))


def plain_cross_entropy(loss_fn: nn.Module | None) -> bool:
    """Whether a recipe's loss is what the chunked head computes: none (the model's own or the default), or
    torch's cross-entropy with its defaults (mean over the targets, no class weights, no label smoothing)."""
    if loss_fn is None:
        return True
    fn, kwargs = getattr(loss_fn, "fn", None), getattr(loss_fn, "kwargs", None)
    if fn is nn.functional.cross_entropy:  # the function, named as the loss (launcher/losses.py)
        return not kwargs and loss_fn.reduction == "mean"
    return (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
        and loss_fn.label_smoothing == 0.0
        and loss_fn.ignore_index == IGNORE_INDEX
    )


def choose(setting: bool | str, model: nn.Module, loss_fn: nn.Module | None, install: Any) -> tuple[bool, str | None]:
    """Whether a run computes its loss with the chunked head (`train.chunked_loss`: true, false or auto), and a
    note for the user when it was asked for and cannot be. `auto` chunks a causal LM with a vocabulary of
    AUTO_MIN_VOCAB or more and the plain cross-entropy. The head is made ready (`model.chunk_head()`, or
    `install(model)` for a model without that method: the Hugging Face one) only when it is used."""
    if setting is False:
        return False, None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    plain = plain_cross_entropy(loss_fn)
    if setting == "auto" and (not plain or not isinstance(head, nn.Linear) or head.out_features < AUTO_MIN_VOCAB):
        return False, None
    why = None if plain else f"the loss ({type(loss_fn).__name__}) is not plain cross-entropy"
    if why is None:
        ready = getattr(model, "chunk_head", None)
        why = ready() if callable(ready) else install(model) if hasattr(model, "config") else _no_head(model)
    if why is not None:
        return False, f"note: train.chunked_loss: {why}; the plain loss is used"
    return True, None


def _no_head(model: nn.Module) -> str:
    return f"{type(model).__name__} has no separable output projection (a `chunk_head` method)"
