"""The GPT language model: plain PyTorch, readable top to bottom.

The decoder-only transformer of the "Let's build GPT" lecture and nanoGPT: token and learned
position embeddings, pre-LayerNorm blocks of causal multi-head self-attention and a feed-forward
network, a final LayerNorm and an lm_head tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Literal, Optional, get_args

import torch
import torch.nn as nn
from torch.nn import functional as F

# "gelu" is the exact (erf) GELU; "gelu_tanh" its tanh approximation, GPT-2's own ("gelu_new" in transformers)
Activation = Literal["gelu", "gelu_tanh", "relu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
# subword vocabularies are padded to a multiple of this for faster matmuls (nanoGPT: GPT-2's 50257 -> 50304)
VOCAB_MULTIPLE = 64
# up to this size (characters, bytes) the head is a negligible share of the work and stays unpadded: a char
# model keeps the lecture's parameter count and initial weights
UNPADDED_VOCAB = 256


def setting(default: Any, **marks: bool) -> Any:
    """A dataclass field with its default and marks (field metadata) naming the lists of settings it belongs to.

    The lists are read off the fields with marked(), so a setting is named once, where it is defined.
    """
    return field(default=default, metadata=marks)


def marked(cls: type, mark: str) -> tuple[str, ...]:
    """The names of the dataclass cls's fields that carry mark (see setting), in the order they are defined."""
    return tuple(f.name for f in fields(cls) if f.metadata.get(mark))


def from_fields(cls: type, values: Any) -> Any:
    """An instance of the dataclass cls from a mapping that may hold other keys too (a checkpoint's hyperparameters)."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class GPTConfig:
    """Shape of the network. The defaults are the lecture's Shakespeare model (about 10.7M parameters).

    Marks: shape, the weights mean nothing under another value (a resumed run must keep it); pretrained, a pretrained
    GPT-2 folder fixes it (--model.init_from); exported, nanogpt-export writes it into GPT-2's config (a field without
    this mark must keep its default for a model to be exported).
    """

    vocab_size: int = setting(65, shape=True, exported=True)
    block_size: int = setting(256, shape=True, exported=True)  # the longest context the model sees
    n_layer: int = setting(6, shape=True, pretrained=True, exported=True)
    n_head: int = setting(6, shape=True, pretrained=True, exported=True)
    n_embd: int = setting(384, shape=True, pretrained=True, exported=True)
    dropout: float = setting(0.2, exported=True)
    # biases in Linear and LayerNorm layers, as in GPT-2
    bias: bool = setting(True, shape=True, pretrained=True, exported=True)
    # feed-forward non-linearity: "gelu", "gelu_tanh" or "relu"
    activation: Activation = setting("gelu", shape=True, pretrained=True, exported=True)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                f"pick n_embd as a multiple of n_head, e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Builds a config from a dict that may hold other keys too (e.g. a checkpoint's hyperparameters)."""
        return from_fields(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: vocab_size, rounded up to VOCAB_MULTIPLE above UNPADDED_VOCAB.

        The extra ids never occur in the data; the forward pass drops their logits, so they are never sampled
        and never count in the loss (a pretrained GPT-2's zero padding rows would otherwise dominate it).
        """
        if self.vocab_size <= UNPADDED_VOCAB:
            return self.vocab_size
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, so decoding computes one new token per step.

    Slot t holds the key and value of the token at position t of the current window (0 <= t < block_size).
    """

    def __init__(self, batch_size: int, n_head: int, block_size: int, head_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_head, block_size, head_size)
        # not persistent: a cache is scratch space, never part of a checkpoint
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, nh, T, hs) at positions input_pos (T,); returns all slots, 2 x (B, nh, block_size, hs)."""
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # queries, keys and values for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: Optional[KVCache] = None  # set by GPT.setup_cache for generation

    def forward(
        self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: (B, T, C). With input_pos (T,) the new keys and values go to the cache and the queries attend
        to every cached slot that mask (T, block_size) allows; without it, causal attention within x."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, block_size, hs)
            # the fixed-size buffer keeps shapes static (compile-friendly); mask hides the slots not yet written
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        else:
            # softmax(q k^T / sqrt(hs)) v under a lower-triangular mask; SDPA picks flash kernels on GPUs
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network, 4x wider than the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        if config.activation == "relu":
            self.act: nn.Module = nn.ReLU()
        else:
            self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """A transformer block: communication (attention) then computation (MLP), each pre-normed and residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """A decoder-only transformer language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the input embedding and the output projection share one matrix
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two of them
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; the tied lm_head is counted once. non_embedding drops the position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, input_pos: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab) and the mean cross-entropy, or None.

        Decoding with a KV cache (see setup_cache) passes input_pos (T,), the window positions of idx's tokens:
        their keys and values are stored, attention covers everything cached before them, and only the
        last position's logits (B, 1, vocab) are computed, since only they predict the next token.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device) if input_pos is None else input_pos  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = None
        if input_pos is not None:
            # query at position p sees cache slots 0..p: (T, block_size), True = attend
            slots = torch.arange(self.config.block_size, device=idx.device)
            mask = slots[None, :] <= input_pos[:, None]
        for block in self.transformer.h:
            x = block(x, input_pos, mask)
        if input_pos is not None:
            x = x[:, -1:, :]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, padded_vocab): the matmul runs on the padded, faster shape
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, vocab), a view; the loss copies it once
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def setup_cache(self, batch_size: int) -> None:
        """Gives every attention layer an empty KV cache for batch_size rows (on the weights' device and dtype)."""
        weight = self.transformer.wte.weight
        hs = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.n_head, self.config.block_size, hs, weight.dtype, weight.device
            )

    def clear_cache(self) -> None:
        """Frees the KV caches (forward without input_pos never uses them)."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def window_start(self, length: int, start: int) -> int:
        """Where the context window starts for predicting token number `length`, given its previous start.

        The window grows to block_size tokens; the next token then restarts it from the last
        block_size // 2 tokens (nanoGPT slides it by one instead, which recomputes a whole block
        per token: with learned absolute positions every cached key would change).
        """
        if length - start > self.config.block_size:
            return length - max(1, self.config.block_size // 2)
        return start

    @torch.no_grad()
    def generate_tokens(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Samples up to max_new_tokens tokens after idx (B, T), yielding each step's (B, 1) tokens as they come.

        With use_cache, a step runs the network on the new token only (the window's earlier keys and
        values are cached); when the window restarts (see window_start) one forward pass over the kept
        tokens re-primes the cache. Without it, every step recomputes the whole window. Both see the
        same windows, so under the same generator they produce the same tokens.
        """
        start, cached = 0, 0  # window start in idx; how many of the window's tokens the cache holds
        if use_cache:
            self.setup_cache(idx.size(0))
        try:
            for _ in range(max_new_tokens):
                length = idx.size(1)
                new_start = self.window_start(length, start)
                if new_start != start:
                    start, cached = new_start, 0  # positions moved: the cached keys are stale
                if use_cache:
                    input_pos = torch.arange(cached, length - start, device=idx.device)  # (T_new,)
                    logits, _ = self(idx[:, start + cached :], input_pos=input_pos)
                    cached = length - start
                else:
                    logits, _ = self(idx[:, start:])
                idx_next = sample_logits(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat((idx, idx_next), dim=1)
                yield idx_next
        finally:
            if use_cache:
                self.clear_cache()

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        top_p: Optional[float] = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Samples max_new_tokens tokens after idx (B, T); returns (B, T + max_new_tokens). See generate_tokens."""
        steps = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        return torch.cat([idx, *steps], dim=1)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Picks one token per row of logits (B, vocab); returns (B, 1).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by temperature, cut to the top_k
    most likely tokens, then to the smallest set whose probability reaches top_p (nucleus sampling).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)  # (B, top_k), descending
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, vocab)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
