"""`launcher plan`'s estimate of activation memory: what one micro-batch's forward keeps for backward on each
process, with and without activation checkpointing.

Measured, not guessed: the model is built on the meta device (no memory, no compute) and one micro-batch goes
through it and the loss there, under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor saved for
backward. Each is counted once (by identity), parameters not at all, and charged to the block (`train.blocks`)
whose forward was running. A recomputed block keeps only its input; in backward its forward runs again, one
block at a time, so the largest of them is alive at once on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from launcher import batches, chunked_loss, components, losses
from launcher.blocks import block_names, find_blocks, recompute_every, recomputed
from launcher.models import hf
from launcher.recipe import Recipe
from launcher.strategies import tensor_parallel
from launcher.strategies.memory import gib as gib_or_mib


@dataclass(frozen=True)
class Saved:
    """Bytes saved for backward by one micro-batch: outside the blocks, in each block, and each block's input."""

    outside: int
    blocks: tuple[int, ...]
    inputs: tuple[int, ...]

    def kept(self, again: Sequence[bool]) -> int:
        """Bytes alive at backward's peak when the blocks marked in `again` are recomputed."""
        kept = self.outside + sum(b for b, r in zip(self.blocks, again, strict=True) if not r)
        recomputed_blocks = [i for i, r in enumerate(again) if r]
        if recomputed_blocks:
            kept += sum(self.inputs[i] for i in recomputed_blocks)
            kept += max(self.blocks[i] for i in recomputed_blocks)
        return kept


def gib(n: int) -> str:
    return gib_or_mib(n) if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class FusedAttention(TorchFunctionMode):
    """On the meta device `scaled_dot_product_attention` takes its unfused path, which saves every attention score
    for backward; the fused kernels a run uses (flash, memory-efficient) save only the output and its log-sum-exp.
    Without a mask, the fused CPU kernel's shapes stand in for them; with grouped key-value heads (`enable_gqa`,
    as Hugging Face's Llama-style models ask), given the keys and values repeated to the queries' heads, as the
    kernels take them."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        if given.get("attn_mask") is not None:
            return func(*args, **kwargs)
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        q, k, v = given["query"], given["key"], given["value"]
        if given.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            groups = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        return fused(q, k, v, given.get("dropout_p", 0.0), given.get("is_causal", False), scale=given.get("scale"))[0]


class PlainConditions(TorchFunctionMode):
    """A condition on a meta tensor's value has no answer (`bool()` would read it): it is taken as true. Hugging
    Face's models ask one of every batch, whether its position ids hold several packed sequences (`(... == 0)
    .all()`: true, they do not), and true is what a batch of plain blocks answers."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.__bool__ and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return True
        return func(*args, **(kwargs or {}))


def measure(model: nn.Module, blocks: Sequence[nn.Module], forward: Callable[[], Any]) -> Saved:
    """What `forward()` (the model's forward and the loss) saves for backward, charged to `blocks`."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}  # holds each tensor, so that no id is reused by another while measuring
    running: list[int] = []  # the block whose forward runs (a stack, should blocks nest)
    outside, per_block, inputs = [0], [0] * len(blocks), [0] * len(blocks)

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in seen and id(t) not in params and id(base) not in params:
            seen[id(t)] = t
            if running:
                per_block[running[-1]] += nbytes(t)
            else:
                outside[0] += nbytes(t)
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            running.append(i)
            inputs[i] = nbytes(args[0]) if args else 0

        return hook

    def leave(*_: Any) -> None:
        running.pop()

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(leave) for block in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FusedAttention(), PlainConditions():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return Saved(outside[0], tuple(per_block), tuple(inputs))


def meta_batch(sample: Any, batch_size: int) -> tuple[Any, torch.Tensor]:
    """A micro-batch of `batch_size` samples shaped like `sample`, on the meta device."""

    def stacked(value: Any) -> torch.Tensor:
        value = torch.as_tensor(value)
        return torch.empty((batch_size, *value.shape), dtype=value.dtype, device="meta")

    inputs, targets = batches.split(sample)
    if isinstance(inputs, dict):
        return {name: stacked(value) for name, value in inputs.items()}, stacked(targets)
    return stacked(inputs), stacked(targets)


def estimate(recipe: Recipe, sample: tuple[Any, Any], model_kwargs: dict[str, Any]) -> tuple[Saved, tuple[str, ...]]:
    """The bytes one micro-batch of `recipe` saves for backward, and the block class names they are charged to."""
    with torch.device("meta"):
        model = components.instantiate("model", recipe.model, **model_kwargs)
        loss_fn = losses.build(recipe.loss) if recipe.loss is not None else None
    model.train()
    inputs, targets = meta_batch(sample, recipe.train.batch_size)
    names = block_names(model, recipe)
    blocks = find_blocks(model, names)
    # With the chunked head: what it keeps (gradients of the hidden states and the weight), not the logits.
    chunked = chunked_loss.choose(recipe.train.chunked_loss, model, loss_fn, hf.chunk_head)[0]
    if recipe.strategy.tp.size > 1:  # a process's share of the split modules; the logits gathered whole
        tensor_parallel.local_shapes(model, recipe)
        chunked = False
    return measure(model, blocks, lambda: batches.micro_batch_loss(model, loss_fn, inputs, targets, chunked)), names


def describe(recipe: Recipe, sample: tuple[Any, Any] | None, model_kwargs: dict[str, Any]) -> list[str]:
    """The lines `launcher plan` shows of activation memory: without checkpointing, with every block recomputed
    and, where the recipe recomputes every k-th, with that; the recipe's choice marked."""
    if sample is None:
        return ["activations   not estimated (no sample of the train set to shape a micro-batch)"]
    try:
        saved, names = estimate(recipe, sample, model_kwargs)
    except Exception as e:  # a model whose forward does not run on the meta device
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        return [f"activations   not estimated (the forward does not run on the meta device: {reason})"]
    count, split = len(saved.blocks), recipe.strategy.tp.size > 1
    every = recompute_every(recipe)
    options = {0: ("none", saved.kept([False] * count))}
    if count:
        options[1] = ("full", saved.kept([True] * count))
    if count and every > 1:
        options[every] = (f"every {every}", saved.kept(recomputed(count, every)))
    shown = "; ".join(f"{name} {gib(n)}{' (the recipe)' if k == every else ''}" for k, (name, n) in options.items())
    lines = [
        f"activations   per process, one micro-batch of {recipe.train.batch_size}, in fp32, saved for backward"
        + (" (a tensor-parallel share of the split layers; the residual stream and logits whole):" if split else ":"),
        f"              {shown}",
    ]
    if not count:
        lines.append(f"              no {'/'.join(names) or 'block'} modules found to recompute (see train.blocks)")
    else:
        lines.append(f"              ({count} {'/'.join(names)} blocks; recomputed ones keep their input)")
    return lines
