"""Tokenizers for the Hugging Face datasets: an `AutoTokenizer` from a directory or Hub name, or the built-in
byte-level one (`bytes`), each checked before it loads, and the fingerprint that keys a tokenized cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from launcher import hub
from launcher.components import ArgumentProblem, optional

BYTES = "bytes"  # the built-in tokenizer: one token per byte, and an end-of-text token
END_OF_TEXT = "<|endoftext|>"


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges (GPT-2's byte alphabet): any text, 257 tokens, nothing to download.
    It saves and loads like any other (`ckpt export --format hf` writes it beside the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_characters().items()} | {END_OF_TEXT: 256}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    fast = optional("transformers", "hf").PreTrainedTokenizerFast
    return fast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def byte_characters() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte value, so that a token's id is its byte's value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def load_tokenizer(name: str) -> Any:
    """`AutoTokenizer` from a local directory or Hub name, or the built-in `bytes`; a tokenizer without a padding
    token pads with its end of text token, as Hugging Face's recipes do."""
    auto_tokenizer = optional("transformers", "hf").AutoTokenizer
    if name == BYTES:
        return byte_tokenizer()
    problem = tokenizer_path_problem(name)
    if problem:
        raise ArgumentProblem("tokenizer", problem)
    if not Path(name).expanduser().exists():
        hub.require(name, "tokenizer", "tokenizer")
    try:
        tokenizer = auto_tokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ArgumentProblem("tokenizer", f"cannot load {name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# What a tokenizer's `save_pretrained` writes, one at least (fast tokenizers, slow ones' vocabularies, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")  # or a *.model file


def tokenizer_path_problem(name: str) -> str | None:
    """What is wrong with a local tokenizer path (None: a good one, or a Hub name), without loading it."""
    path = Path(name).expanduser()
    if not (path.exists() or name.startswith(("/", ".", "~"))):
        return None  # a Hub name
    if path.is_file():
        return f"{path} is a file: expected the directory a tokenizer's save_pretrained wrote (or bytes)"
    if not path.is_dir():
        return f"no such directory: {path} (relative paths start at {Path.cwd()})"
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.model")):
        return f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): not a saved tokenizer"
    return None


def fingerprint(tokenizer: Any) -> str:
    """What identifies a tokenizer's encoding: its whole definition where it is a fast one, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.all_special_tokens}".encode()).hexdigest()
