"""Hugging Face `transformers` models: causal language models (`hf_causal_lm`) and sequence classifiers
(`hf_classifier`), loaded from a local directory or a Hub name (`pretrained`), or built fresh from a config
(`config: {model_type: llama, hidden_size: ...}`).

What the data tells the model (`vocab_size`, `block_size`, the tokenizer's bos/eos/pad ids, `num_labels`) fills a
fresh config's gaps and is checked against a pretrained one: a tokenizer larger than the embedding, or blocks longer
than the positions the model has, are refused before anything trains. The key-value cache is off: training does not
use it, and its objects in the output only cost memory (an export turns it back on, for `generate()`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from launcher import hub
from launcher.batches import IGNORE_INDEX
from launcher.chunked_loss import ChunkedLinear
from launcher.components import ArgumentProblem, describe, optional
from launcher.models import lora as lora_adapters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_FILE = "config.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # what the tokenizer tells the model's config


def transformers_module() -> Any:
    """`transformers`, or one line naming the extra that installs it."""
    return optional("transformers", "hf")


def local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub name (`org/model`)."""
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def load_config(pretrained: str | None, config: Mapping[str, Any] | None, trust_remote_code: bool = False) -> Any:
    """The model's `PretrainedConfig`: a saved model's (a local directory with config.json, or a Hub name), or one
    built from the recipe's `config` (its `model_type` and fields)."""
    transformers = transformers_module()
    if (pretrained is None) == (config is None):
        raise ArgumentProblem("pretrained", "give either pretrained (a directory or Hub name) or config, not both")
    if config is not None:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ArgumentProblem("config.model_type", "missing: the architecture, such as llama, gpt2 or bert")
        if model_type not in transformers.CONFIG_MAPPING:
            known = list(transformers.CONFIG_MAPPING)
            raise ArgumentProblem("config.model_type", unknown_model_type(model_type, known))
        try:
            return transformers.AutoConfig.for_model(model_type, **fields)
        except ValueError as e:
            raise ArgumentProblem("config.model_type", str(e).splitlines()[0]) from None
    assert pretrained is not None
    if local(pretrained):
        path = Path(pretrained).expanduser()
        if path.is_file():
            raise ArgumentProblem(
                "pretrained", f"{path} is a file; expected a saved model's directory (with {CONFIG_FILE} in it)"
            )
        if not path.is_dir():
            raise ArgumentProblem("pretrained", f"no such directory: {path} (relative paths start at {Path.cwd()})")
        if not (path / CONFIG_FILE).is_file():
            raise ArgumentProblem("pretrained", f"{path} has no {CONFIG_FILE}: not a saved Hugging Face model")
    else:
        hub.require(pretrained, "pretrained", "model")
    try:
        return transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ArgumentProblem("pretrained", f"cannot load {pretrained!r}: {str(e).splitlines()[0]}") from None


def unknown_model_type(name: str, known: list[str]) -> str:
    """One line for a `model_type` transformers does not have, with the nearest ones it has."""
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}?" if near else "expected an architecture such as llama, gpt2 or bert"
    return f"unknown model_type {name!r} ({len(known)} known to transformers {transformers_version()}): {hint}"


def transformers_version() -> str:
    return str(getattr(transformers_module(), "__version__", ""))


def max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def fit_to_data(config: Any, fresh: Mapping[str, Any] | None, told: Mapping[str, Any]) -> None:
    """Fill the config from what the data tells (the fields a fresh config, `fresh`, leaves unset; None for a
    pretrained model) and refuse what cannot fit."""
    vocab = told.get("vocab_size")
    if vocab is not None:
        if fresh is not None and "vocab_size" not in fresh:
            config.vocab_size = vocab
        if vocab > config.vocab_size:
            raise ArgumentProblem(
                "vocab_size",
                f"the tokenizer has {vocab:,} tokens, more than the model's embedding of {config.vocab_size:,} "
                "(config.vocab_size): use the model's own tokenizer, or a config with a larger vocab_size",
                key="model",
            )
    block, positions = told.get("block_size"), max_positions(config)
    if block is not None and positions is not None and block > positions:
        raise ArgumentProblem(
            "block_size",
            f"the data's block_size {block} is more than the model's {positions} positions "
            "(max_position_embeddings): use a smaller block_size",
            key="model",
        )
    for name in TOKEN_IDS:
        # The tokenizer's ids, not the architecture's defaults (Llama's 1 and 2 may be other tokens here): they go
        # into the generation config, and so into the export, where `generate()` stops at the end-of-text id.
        # A pretrained model's own ids (Llama 3's several end ids) are kept where it has them.
        unset = name not in fresh if fresh is not None else getattr(config, name, None) is None
        if told.get(name) is not None and unset:
            setattr(config, name, told[name])
    if told.get("num_labels") is not None:
        names = told.get("labels") or [str(i) for i in range(told["num_labels"])]
        config.num_labels = told["num_labels"]
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    config.use_cache = False


def build(
    auto_class: str,
    pretrained: str | None,
    config: Mapping[str, Any] | None,
    dtype: str,
    attn_implementation: str | None,
    trust_remote_code: bool,
    told: Mapping[str, Any],
    lora: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The model: a pretrained one's weights loaded, a fresh one initialised from the seeded RNG. On the meta device
    (validation, `launcher plan`) only the config is read, never the weights."""
    if dtype not in DTYPES:
        raise ArgumentProblem("dtype", f"expected one of: {', '.join(DTYPES)}, got {describe(dtype)}")
    hf_config = load_config(pretrained, config, trust_remote_code)
    fit_to_data(hf_config, config, told)
    auto = getattr(transformers_module(), auto_class)
    options: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    try:
        if pretrained is None or torch.get_default_device().type == "meta":
            model = auto.from_config(hf_config, **options)
        else:
            model = auto.from_pretrained(pretrained, config=hf_config, **options, **lora_adapters.load_options(lora))
    except ValueError as e:  # an architecture without this head, an attention implementation it lacks
        raise ArgumentProblem("pretrained" if config is None else "config", str(e).splitlines()[0]) from None
    declare_flops(model)
    return model if lora is None else lora_adapters.apply(model, lora, auto_class, pretrained)


def declare_flops(model: torch.nn.Module) -> None:
    """Give the model PaLM's formula (appendix B) as `flops_per_token`, as the built-in GPT has: 6 FLOPs per weight
    of every matmul per token, plus attention's 12 x layers x width x sequence length. Counted now, as built:
    sharding leaves each rank only a part of the weights. A model with a formula is not run under torch's FLOP
    counter, whose dispatch changes a Hugging Face model's gradients in their last bits (a resumed run would then
    differ from the uninterrupted one)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(width, int):
        return
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    model.flops_per_token = functools.partial(palm_flops, float(sum(weights.values())), layers, width)


def palm_flops(matmul_weights: float, layers: int, width: int, seq_len: int) -> float:
    return 6.0 * matmul_weights + 12.0 * layers * width * seq_len


def causal_lm(
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
    block_size: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    packed: bool = False,
    lora: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A causal language model (`AutoModelForCausalLM`). `vocab_size`, `block_size` and the special tokens' ids
    come from the data (its tokenizer and blocks); `packed`: rows of several examples, told apart by
    `position_ids`; `lora`: train LoRA adapters only (see models/lora.py)."""
    told = {"vocab_size": vocab_size, "block_size": block_size}
    told |= {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    model = build("AutoModelForCausalLM", pretrained, config, dtype, attn_implementation, trust_remote_code, told, lora)
    problem = packing_problem(model) if packed else None
    if problem:
        why = f"{problem}: its attention would cross packed examples; set data.dataset.packing=false"
        raise ArgumentProblem("packing", why, key="model")
    return model


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why a model cannot keep packed examples apart, or None: it must take `position_ids` and build its mask with
    `transformers.masking_utils`, which makes a block-diagonal causal mask of them when no attention mask is given
    (eager, sdpa, flex attention; flash attention reads them as sequence boundaries)."""
    name = type(model).__name__
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{name} takes no position_ids"
    source = inspect.getsource(sys.modules[type(model).__module__])
    if "masking_utils" not in source:
        return f"{name} does not build its attention mask with transformers' masking_utils"
    return None


def classifier(
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
    block_size: int | None = None,
    pad_token_id: int | None = None,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    lora: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A sequence classifier (`AutoModelForSequenceClassification`); `num_labels` and their names come from the
    data. A pretrained model gets a fresh classification head of that size."""
    told = {
        "vocab_size": vocab_size,
        "block_size": block_size,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "num_labels": num_labels,
        "labels": labels,
    }
    return build(
        "AutoModelForSequenceClassification",
        pretrained,
        config,
        dtype,
        attn_implementation,
        trust_remote_code,
        told,
        lora,
    )


def check_args(args: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(argument, problem) pairs for what the builders refuse without reading anything."""
    problems = []
    if (args.get("pretrained") is None) == (args.get("config") is None):
        problems.append(("pretrained", "give either pretrained (a directory or Hub name) or config, not both"))
    if args.get("dtype") not in DTYPES:
        problems.append(("dtype", f"expected one of: {', '.join(DTYPES)}, got {describe(args.get('dtype'))}"))
    return problems + lora_adapters.problems(args.get("lora"), args.get("pretrained"))


causal_lm.check_args = check_args  # type: ignore[attr-defined]
classifier.check_args = check_args  # type: ignore[attr-defined]


def export_files(model: torch.nn.Module, tokenizer: Any) -> dict[str, bytes]:
    """The files a Hugging Face model directory has besides its weights: its config, generation config and the
    tokenizer it trained with, by name. Empty for a model that is not a `transformers` one."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        model.config.architectures = [type(model).__name__]  # what `ckpt export --format hf` builds
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}


def chunk_head(model: torch.nn.Module) -> str | None:
    """Make a causal language model compute its loss with the chunked head (`train.chunked_loss`): its decoder
    runs as before, and its output projection is given the shifted labels instead of making the logits. None when
    done, else why it cannot be (the model then keeps its plain loss)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or head.bias is not None or not isinstance(decoder, torch.nn.Module):
        return f"{type(model).__name__} has no separable output projection (a decoder, then one bias-free Linear)"
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) is not None:
        return f"{type(model).__name__} scales its logits after the output projection"
    # The same parameters and state dict: only what its call computes changes, so checkpoints and exports are as
    # before.
    head.__class__ = ChunkedLinear
    model.forward = types.MethodType(_chunked_forward, model)
    return None


def _chunked_forward(
    self: Any, input_ids: Any = None, labels: Any = None, reduction: str = "mean", **kwargs: Any
) -> Any:
    """A causal LM's forward with `chunk_head`: given labels, their cross-entropy (Hugging Face's convention:
    labels are the inputs, position t predicts label t+1, -100 counts nowhere); without, the model's own forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    hidden = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kwargs)[0]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return self.get_output_embeddings()(hidden, shifted, reduction)
