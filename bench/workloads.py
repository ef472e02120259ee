"""The workloads every variant trains: the same model, data, batch size, optimizer and clipping.

(a) a tiny MLP on the built-in synthetic set, where the cost per step of the loop itself dominates;
(m) a tiny MLP with AdamW on one thread: the host time per update (the host-time part of `python -m bench`);
(b) the char transformer of `recipes/charlm.yaml` on Tiny Shakespeare, where compute dominates;
(g) the CPU variant of `recipes/gpt_ddp.yaml` (2 layers, 64 wide) on byte tokens of Tiny Shakespeare, made by
`launcher tokenize` (the speed part: bench/speed.py).

torch is imported only where a model or optimizer is built: the harness that starts the runs stays small, since a
child process's peak memory as the kernel reports it starts from its parent's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CLIP = 1.0
LOG_EVERY = 10  # every variant reports its loss every 10 steps


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    batch_size: int  # per process
    data: Callable[[], Dataset]
    model: Callable[[Dataset], torch.nn.Module]
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]  # given the model: the launcher's param groups
    recipe: Callable[[], str]  # the launcher's recipe for the same run (YAML)
    overrides: tuple[str, ...] = ()  # given to `launcher train` after the recipe
    threads: int | None = None  # torch's threads in every variant (None: torch's default)


def _mlp_data() -> Dataset:
    from launcher.data.synthetic import SyntheticClassification

    return SyntheticClassification(split="train", num_samples=8192, num_features=32, num_classes=4)


def _mlp_model(data: Dataset) -> torch.nn.Module:
    from launcher.models.mlp import MLP

    return MLP(32, 4, hidden_sizes=[64])


def _host_data() -> Dataset:
    from launcher.data.synthetic import SyntheticClassification

    return SyntheticClassification(split="train", num_samples=8192, num_features=64, num_classes=10)


def _host_model(data: Dataset) -> torch.nn.Module:
    from launcher.models.mlp import MLP

    return MLP(64, 10, hidden_sizes=[128])


def _char_data(text: Path) -> Dataset:
    from launcher.data.text import CharText

    return CharText(str(text), split="train", block_size=64)


def _char_model(data: Dataset) -> torch.nn.Module:
    from launcher.models.gpt import GPT

    return GPT(**data.model_kwargs, n_layer=4, n_head=4, n_embd=128, dropout=0.1)  # type: ignore[attr-defined]


def _token_data(tokens: Path) -> Dataset:
    from launcher.data.memmap import TokenMemmap

    return TokenMemmap(str(tokens / "{split}.bin"), split="train", block_size=64, vocab_size=256)


def _small_gpt(data: Dataset) -> torch.nn.Module:
    from launcher.models.gpt import GPT

    return GPT(**data.model_kwargs, n_layer=2, n_head=2, n_embd=64, dropout=0.0)  # type: ignore[attr-defined]


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The launcher's default param groups (`optimizer.decay: matrices`), so that every variant decays alike."""
    from launcher import param_groups

    return param_groups.to_torch(param_groups.make_groups(model, "matrices", [], weight_decay))


def _gpt_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


# Nothing but training: no evaluation, checkpoints or data-loading workers, as the hand-written loops do.
TRAIN_ONLY = (
    "data.val=null",
    "data.num_workers=0",
    "eval.every_steps=null",
    "eval.every_epoch=false",
    "early_stopping=null",
    "checkpoint.every_steps=null",
    "checkpoint.keep_best=0",
    "checkpoint.save_final=false",
)
# recipes/gpt_ddp.yaml made small enough for a CPU (as its own comment and the tests do), on one process, without
# evaluation, checkpoints or data-loading workers: what the hand-written loop does too.
GPT_CPU = (
    "data.dataset.vocab_size=256",
    "data.dataset.block_size=64",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "train.batch_size=8",
    "train.gradient_accumulation_steps=1",
    "train.mixed_precision=no",
    "scheduler.warmup_steps=5",
    f"logging.every_steps={LOG_EVERY}",
    *TRAIN_ONLY,
)


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(_groups(model, 0.0), lr=1e-3)


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def _default_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as people construct it, over the launcher's groups (its default weight decay, 0.01, on the matrices)."""
    import torch

    return torch.optim.AdamW(_groups(model, 0.01))


def _recipe(model: str, dataset: str, optimizer: str, batch_size: int) -> str:
    return f"""\
model: {model}
data:
  dataset: {dataset}
  val: null
optimizer: {optimizer}
train: {{batch_size: {batch_size}, clip_grad_norm: {CLIP}, seed: 0}}
checkpoint: {{save_final: false}}
logging: {{every_steps: {LOG_EVERY}, progress_bar: true}}
"""


def workloads(text: Path = SHAKESPEARE, tokens: Path | None = None) -> dict[str, Workload]:
    """The workloads; (g) only with `tokens`, a folder of `launcher tokenize`'s train.bin and val.bin."""
    out = {
        "a": Workload(
            key="a",
            title="tiny MLP (32-64-4, 2.4k parameters) on the synthetic set, batch 32, Adam",
            batch_size=32,
            data=_mlp_data,
            model=_mlp_model,
            optimizer=_adam,
            recipe=lambda: _recipe(
                "{_component_: mlp, hidden_sizes: [64]}",
                "{_component_: synthetic_classification, num_features: 32, num_classes: 4, num_samples: 8192}",
                "{_component_: adam, lr: 0.001}",
                32,
            ),
        ),
        "b": Workload(
            key="b",
            title="char transformer (4 layers, 128 wide, 0.8M parameters) on Tiny Shakespeare, batch 16 x 64, AdamW",
            batch_size=16,
            data=functools.partial(_char_data, text),
            model=_char_model,
            optimizer=_adamw,
            recipe=lambda: _recipe(
                "{_component_: gpt, n_layer: 4, n_head: 4, n_embd: 128, dropout: 0.1}",
                f"{{_component_: char_text, path: '{text}', block_size: 64}}",
                "{_component_: adamw, lr: 0.001, betas: [0.9, 0.99], weight_decay: 0.1}",
                16,
            ),
        ),
    }
    out["m"] = Workload(
        key="m",
        title="tiny MLP (64-128-10, 9.6k parameters) on the synthetic set, batch 32, AdamW (torch's defaults), "
        "one thread",
        batch_size=32,
        data=_host_data,
        model=_host_model,
        optimizer=_default_adamw,
        recipe=lambda: _recipe(
            "{_component_: mlp, hidden_sizes: [128]}",
            "{_component_: synthetic_classification, num_features: 64, num_classes: 10, num_samples: 8192}",
            "{_component_: adamw}",
            32,
        ),
        threads=1,
    )
    out["h"] = hf_workload(text)
    if tokens is not None:
        out["g"] = Workload(
            key="g",
            title="GPT recipe's CPU variant (`recipes/gpt_ddp.yaml`: 2 layers, 64 wide, 0.1M parameters) on byte "
            "tokens of Tiny Shakespeare, batch 8 x 64, AdamW, fp32",
            batch_size=8,
            data=functools.partial(_token_data, tokens),
            model=_small_gpt,
            optimizer=_gpt_adamw,
            recipe=lambda: (REPO / "recipes" / "gpt_ddp.yaml").read_text(),
            overrides=(*GPT_CPU, f"data.dataset.path={tokens}/{{split}}.bin"),
        )
    return out


HF_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def _hf_data(text: Path) -> Dataset:
    from launcher.data.hf import HFText

    return HFText(str(text), "bytes", split="train", block_size=128)


def _hf_model(data: Dataset) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**HF_LLAMA, vocab_size=data.model_kwargs["vocab_size"], use_cache=False)  # type: ignore[attr-defined]
    return AutoModelForCausalLM.from_config(config)


def _hf_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def hf_workload(text: Path) -> Workload:
    """(h): the default of `recipes/hf_causal_lm.yaml`, a tiny Llama from a config, its own loss."""
    return Workload(
        key="h",
        title="Hugging Face Llama from a config (`recipes/hf_causal_lm.yaml`: 4 layers, 64 wide, 0.2M parameters) "
        "on Tiny Shakespeare's bytes, batch 8 x 128, AdamW, the model's own loss",
        batch_size=8,
        data=functools.partial(_hf_data, text),
        model=_hf_model,
        optimizer=_hf_adamw,
        recipe=lambda: _recipe(
            f"{{_component_: hf_causal_lm, config: {json.dumps(HF_LLAMA)}}}",
            f"{{_component_: hf_text, path: '{text}', tokenizer: bytes, block_size: 128}}",
            "{_component_: adamw, lr: 0.001, betas: [0.9, 0.95], weight_decay: 0.1}",
            8,
        ),
    )


def step_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """A batch's loss: a mapping (Hugging Face) through the model's own loss, a pair through `loss_of`."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return loss_of(model(batch[0]), batch[1])


def loss_of(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; sequence outputs are flattened, as the launcher does."""
    import torch

    if output.dim() > 2:
        return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return torch.nn.functional.cross_entropy(output, targets)
