"""A small GPT-style causal transformer (pre-norm, learned positions, tied embeddings), for char or token LMs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from launcher.chunked_loss import ChunkedLinear
from launcher.components import fraction_problem, integer_problem

# Every block is a handful of Python modules: a deeper stack takes minutes just to construct (even on the meta
# device, where validation builds it), and no trainable GPT comes near it.
MAX_LAYERS = 1000


class CausalSelfAttention(nn.Module):
    """Queries, keys and values in projections of their own, so that tensor parallelism splits each by heads; the
    heads are counted from the projections' outputs (a tensor-parallel process holds a share of them)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.k = nn.Linear(n_embd, n_embd, bias=bias)
        self.v = nn.Linear(n_embd, n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.register_load_state_dict_pre_hook(split_fused_qkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z(x).view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(b, t, -1)))


def split_fused_qkv(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state dict written before queries, keys and values had projections of their own (one `qkv`, their rows
    stacked in that order) loads as it did."""
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            for name, part in zip("qkv", fused.chunk(3), strict=True):
                state_dict[f"{prefix}{name}.{kind}"] = part


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Maps token ids (batch, time) to next-token logits (batch, time, vocab_size); given targets, to their
    cross-entropy instead, computed in chunks of tokens without the logits (`train.chunked_loss`)."""

    _no_split_modules = ("Block",)  # its repeated blocks (the Hugging Face convention): see launcher/blocks.py

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = ChunkedLinear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: fewer parameters, better small-data LMs
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        # Counted now: a strategy may shard or partition the parameters later (ZeRO-3 leaves them empty).
        self.matmul_weights = sum(
            p.numel() for name, p in self.named_parameters() if p.dim() == 2 and name != "wpe.weight"
        )

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> Any:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x), targets, reduction)

    @staticmethod
    def tp_plan() -> dict[str, str]:
        """How tensor parallelism splits the model (launcher/strategies/tensor_parallel.py): attention by heads, the
        MLP by hidden units, the tied embedding and output head by vocabulary (the logits gathered for the loss)."""
        return {
            "wte": "rowwise",
            "blocks.*.attn.[qkv]": "colwise",
            "blocks.*.attn.proj": "rowwise",
            "blocks.*.mlp.0": "colwise",
            "blocks.*.mlp.2": "rowwise",
            "lm_head": "colwise_gather",
        }

    def get_output_embeddings(self) -> nn.Module:
        """The output projection (the Hugging Face name), which `train.chunked_loss` looks at."""
        return self.lm_head

    def chunk_head(self) -> str | None:
        """Ready for `train.chunked_loss` as built: the forward takes targets and the head computes their loss."""
        return None

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward and backward) per token of a sequence of `seq_len` tokens, as in PaLM's appendix
        B: 6 per weight of every matmul (2 forward, 4 backward; the tied output projection is one of them, the
        embeddings' lookups none) plus attention's scores and weighted values, 12 x layers x width x `seq_len`
        (the causal mask not discounted: the kernels compute every score)."""
        return 6.0 * self.matmul_weights + 12.0 * len(self.blocks) * self.wte.embedding_dim * seq_len

    @staticmethod
    def check_args(args: Mapping[str, Any], data: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(argument, problem) pairs for what would fail in training; `args` are the arguments the model gets
        (defaults filled in), `data` what the train set tells the model. Pure: run before anything is built."""
        checks = [(name, integer_problem(args[name], 1)) for name in ("vocab_size", "block_size") if name in args]
        checks += [(name, integer_problem(args.get(name), 1)) for name in ("n_head", "n_embd")]
        checks.append(("n_layer", integer_problem(args.get("n_layer"), 0, MAX_LAYERS)))
        checks.append(("dropout", fraction_problem(args.get("dropout"))))
        found = [(name, problem) for name, problem in checks if problem]
        if found:
            return found
        n_embd, n_head = args["n_embd"], args["n_head"]
        if n_embd % n_head:
            found.append(("n_head", f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})"))
        # The recipe's values win over the data's: smaller ones fail at the first batch.
        for name, what in (("block_size", "tokens per sample"), ("vocab_size", "token ids")):
            if name in data and args.get(name, 0) < data[name]:
                found.append((name, f"is {args[name]}, less than the data's {data[name]} ({what})"))
        return found
