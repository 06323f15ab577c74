"""GPT-2 with multi-head, grouped-query or multi-query attention — one compact file, nanoGPT style.

The one naming convention of the whole project (configs say `kv_groups`, code says `n_kv_groups`):
`n_kv_groups` is G, the number of key/value heads (arXiv 2305.13245). G = n_head is MHA, G = 1 is MQA,
anything between is GQA; the label is always derived from the counts (`attention_label`), never stored.
Query head i reads KV head i // (n_head // G): contiguous groups, the convention of SDPA's `enable_gqa`
and of mean-pooled uptraining. The KV cache holds G heads per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_lightning.common.errors import UserError
from gpt_lightning.model.attention import (GROUPED_MAX_T, choose_sdpa_path, decode_attention, masked_decode_attention,
                                           matmul_attention, sdpa, takes_matmul_attention)
from gpt_lightning.model.cpu_matmul import module_linear
from gpt_lightning.model.kv_cache import KVCache
from gpt_lightning.model.loss import lm_head_loss
from gpt_lightning.model.recompute import TiedGradient, gelu_linear, layer_norm_linear, tied_embedding
from gpt_lightning.model.sampling import decode


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, skipped outright where it is the identity (eval, or p = 0): a decode step passes 19 Dropout
    modules, whose calls cost ~2 us each on the dev CPU (~2% of a batch-1 bf16 step of the 6 x 384 model)."""
    return module(x) if module.training and module.p > 0 else x


def attention_label(n_head: int, n_kv_groups: int) -> str:
    """`mha` when every query head has its own KV head, `mqa` with one KV head, else `gqa`."""
    if n_kv_groups == n_head:
        return "mha"
    return "mqa" if n_kv_groups == 1 else "gqa"


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_kv_groups: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    mlp_hidden: int | None = None  # MLP width; None = 4 * n_embd (GPT-2). Wider to match MHA's parameter count.

    def __post_init__(self):
        # Refuse a bad shape before any weight is allocated, naming the values.
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_groups", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model config: {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_embd as a multiple of the head count"
            )
        if self.n_kv_groups > self.n_head or self.n_head % self.n_kv_groups:
            raise UserError(
                f"model config: n_head={self.n_head} is not divisible by n_kv_groups={self.n_kv_groups}; "
                f"kv_groups must divide the head count (e.g. 1, 2, 4, 8 for 8 heads)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout={self.dropout} must be in [0, 1)")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or isinstance(self.mlp_hidden, bool)
                                            or self.mlp_hidden < 1):
            raise UserError(f"model config: mlp_hidden={self.mlp_hidden!r} must be null or a positive integer")

    @property
    def attention(self) -> str:
        return attention_label(self.n_head, self.n_kv_groups)

    @property
    def hidden(self) -> int:
        """The MLP's inner width: mlp_hidden, or GPT-2's 4 * n_embd (configs and checkpoints without the field)."""
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the LM-head matmul on fast kernel paths (nanoGPT's 50257 -> 50304).
        return math.ceil(self.vocab_size / 64) * 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_groups, self.head_dim = config.n_head, config.n_kv_groups, config.head_dim
        kv_dim = self.n_kv_groups * self.head_dim
        # One fused projection: n_embd query features, then kv_dim key and kv_dim value features.
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sdpa_paths: dict[tuple, tuple[bool, str]] = {}  # (device, dtype, dropout?) -> (expand K/V?, label)
        self.sdpa_path: str | None = None  # the attention path of the last training/prefill call, for the bench

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """Attention over x (B, T, C), normalised by `norm` first where given (in training without keeping norm(x))."""
        B, T, C = x.shape
        kv_dim = self.n_kv_groups * self.head_dim
        qkv = self.c_attn(x) if norm is None else layer_norm_linear(x, norm, self.c_attn)  # (B, T, C + 2 kv_dim)
        q, k, v = qkv.split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_groups, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = v.view(B, T, self.n_kv_groups, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        if cache is not None and cache.length:  # new tokens against a filled cache: decode
            k, v = cache.update(layer, k, v)  # (B, G, L, hd): the cache holds G heads, never n_head
            if T <= GROUPED_MAX_T:  # each KV head read once for its whole query group
                y = decode_attention(q, *cache.buffers(layer), k.size(2))
            else:  # a long chunk: SDPA with the chunk's causal mask (query t sees keys up to L - T + t)
                L = k.size(2)
                visible = torch.ones(T, L, dtype=torch.bool, device=x.device).tril_(L - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                   enable_gqa=self.n_kv_groups != self.n_head)
        else:  # training, or a prefill into an empty cache: causal SDPA (or its matmul form, CPU bf16 training)
            if cache is not None:
                k, v = cache.update(layer, k, v)
            dropout_p = self.dropout if self.training else 0.0
            if takes_matmul_attention(q, dropout_p):
                y = matmul_attention(q, k, v)
                self.sdpa_path = f"matmul softmax (CPU {str(q.dtype).removeprefix('torch.')})"
            else:
                y = sdpa(q, k, v, dropout_p, T > 1, self._expand_kv(q, k, v, T > 1))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hd)
        return dropout(self.resid_dropout, module_linear(y, self.c_proj))  # oneDNN in fp32 CPU training

    def decode_one(self, x: torch.Tensor, cache: KVCache, layer: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        """forward() for one new token per row, x (B, C) -> (B, C), against a cache holding >= 1 position: the same
        values with fewer ops (no (B, T, ...) reshapes or transposes; 537 aten ops per token of the 6 x 384 model
        against forward's 754). Decode runs this once per layer per generated token, where each op's dispatch is a
        visible share of a batch-1 step. With `pos`, a (1,) tensor, the token goes to that position and attention
        reads all of the cache's buffers, masked after it: fixed shapes, for a CUDA graph (`GPT.static_next_logits`)."""
        B, C = x.shape
        G, hd = self.n_kv_groups, self.head_dim
        qkv = self.c_attn(x)  # (B, C + 2 G hd)
        q = qkv[:, :C].view(B, self.n_head, 1, hd)  # (B, nh, 1, hd)
        k, v = qkv[:, C:C + G * hd].view(B, G, 1, hd), qkv[:, C + G * hd:].view(B, G, 1, hd)
        if pos is None:
            cache.write(layer, k, v)
            y = decode_attention(q, *cache.buffers(layer), cache.length + 1)  # (B, nh, 1, hd)
        else:
            cache.write_at(layer, pos, k, v)
            y = masked_decode_attention(q, *cache.buffers(layer), pos)  # (B, nh, 1, hd)
        return self.c_proj(y.reshape(B, C))  # one position: (B, nh, 1, hd) and (B, 1, nh, hd) share their order

    def _expand_kv(self, q, k, v, is_causal: bool) -> bool:
        """Whether GQA expands K/V for SDPA here: decided once per (device, dtype, dropout), see `choose_sdpa_path`.
        The path taken is kept in `self.sdpa_path` (e.g. "flash_attention (enable_gqa)")."""
        dropout = self.dropout if self.training else 0.0
        key = (q.device.type, q.dtype, dropout > 0)
        if key not in self.sdpa_paths:
            if torch.compiler.is_compiling():  # no probing inside a traced graph; the compiler picks its kernel
                return False
            self.sdpa_paths[key] = choose_sdpa_path(q, k, v, dropout, is_causal)
        expand, self.sdpa_path = self.sdpa_paths[key]
        return expand


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """The MLP of x (B, T, C), normalised by `norm` first where given (in training without keeping norm(x))."""
        h = self.c_fc(x) if norm is None else layer_norm_linear(x, norm, self.c_fc)  # (B, T, hidden)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # training: gelu(h) is not kept
            return dropout(self.dropout, gelu_linear(h, self.c_proj.weight, self.c_proj.bias))
        # No gradients (decode swaps c_proj's forward for its matvec layout), or compiling: plain modules.
        return dropout(self.dropout, self.c_proj(F.gelu(h, approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(x, cache, layer, norm=self.ln_1)  # pre-LayerNorm residual blocks
        return x + self.mlp(x, norm=self.ln_2)

    def decode_one(self, x: torch.Tensor, cache: KVCache, layer: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        """forward() for one new token per row: (B, C) -> (B, C) (see CausalSelfAttention.decode_one)."""
        x = x + self.attn.decode_one(self.ln_1(x), cache, layer, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        # Built on the meta device: its own (V, C) weight would be allocated only to be dropped for the tied one
        # (77 MB at the gpt2 vocabulary, C = 384, left as a hole in the CPU heap).
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied LM head counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM estimate: 6N + 12 * L * C * T.

        GQA saves KV-projection parameters (counted in N) but not attention-score FLOPs (the 12LCT term).
        """
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      tied: TiedGradient | None = None) -> torch.Tensor:
        """Final-LayerNorm features (B, T, n_embd); positions continue after what `cache` already holds.
        With `tied`, the token embedding's backward completes the LM head's gradient left there (`tied_embedding`)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        tok = self.transformer.wte(idx) if tied is None else tied_embedding(idx, self.transformer.wte.weight, tied)
        pos = self.transformer.wpe.weight[start:start + T]  # (T, C): positions start.. are one slice, no lookup
        x = dropout(self.transformer.drop, tok + pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def last_logits(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, vocab_size) of the last of idx's (B, T) positions, continuing after what `cache` holds: the LM
        head runs on that position only (a prefill's, or a step's)."""
        return self.lm_head(self.hidden_states(idx, cache)[:, -1])[:, : self.config.vocab_size]

    def next_logits(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab_size) after one new token per row, tokens (B,), appended to `cache`: a decode step.

        The values of `last_logits(tokens[:, None], cache)`, through the blocks' `decode_one`
        (a batch-1 bf16 step of the 6 x 384 model: 2.16 -> 1.97 ms on the dev CPU). In training mode or against an
        empty cache it is that expression itself.
        """
        if self.training or not cache.length:
            return self.last_logits(tokens[:, None], cache)
        start = cache.length
        if start >= self.config.block_size:
            raise ValueError(f"sequence of {start + 1} tokens exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(tokens) + self.transformer.wpe.weight[start]  # (B, C)
        for i, block in enumerate(self.transformer.h):
            x = block.decode_one(x, cache, i)
        cache.advance(1)
        return self.lm_head(self.transformer.ln_f(x))[:, : self.config.vocab_size]

    def static_next_logits(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`next_logits` with the new tokens' position as a (1,) tensor on the model's device, and attention over all
        of `cache`'s buffers (masked after `pos`; `KVCache.prefix` gives a shorter view): no shape, and no Python
        value, depends on the position, so a CUDA graph captured once replays it at every step up to the buffers'
        length (`gpt_lightning.model.graphed_decode`). It neither checks nor advances `cache.length`: the caller
        keeps pos < min(max_len, block_size) and advances the cache."""
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)  # (B, C) + (1, C)
        for i, block in enumerate(self.transformer.h):
            x = block.decode_one(x, cache, i, pos)
        return self.lm_head(self.transformer.ln_f(x))[:, : self.config.vocab_size]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T), or with (B, T) targets the mean next-token loss.

        With targets, the LM head and the loss run fused in row chunks (`lm_head_loss`): the (B*T, vocab) logits
        and their gradient are never materialised whole. Under torch.compile the plain head + cross-entropy is
        traced instead (the compiler fuses it its own way; the eager autograd.Function would break the graph).
        The tied weight's two gradients (LM head, token embedding) are summed in one (V, C) tensor (`TiedGradient`).
        """
        if targets is None:
            return self.lm_head(self.hidden_states(idx))[..., : self.config.vocab_size]
        if torch.compiler.is_compiling():
            logits = self.lm_head(self.hidden_states(idx))[..., : self.config.vocab_size].float()  # (B, T, vocab)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        tied = TiedGradient() if torch.is_grad_enabled() else None
        h = self.hidden_states(idx, tied=tied)  # (B, T, C)
        return lm_head_loss(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.config.vocab_size,
                            tied=tied)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        """A preallocated cache for `block_size` positions holding n_kv_groups heads per layer."""
        p = self.lm_head.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_kv_groups, c.block_size, c.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = True) -> torch.Tensor:
        """Extend (B, T) token ids by `max_new_tokens` sampled tokens; temperature 0 is greedy.

        Decodes with a preallocated KV cache of n_kv_groups heads per layer; the context is cropped to
        the last `block_size` tokens (see `gpt_lightning.model.sampling.decode`). On a GPU the steps replay a CUDA
        graph unless `cuda_graph` is False.
        """
        return decode(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=generator, cuda_graph=cuda_graph)
