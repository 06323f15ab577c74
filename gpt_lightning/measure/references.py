"""The bench's other contenders, same shape as ours: a naive reference (manual masked softmax, K/V copied per
query head, hand-written LayerNorm and GELU: how the original project computed attention), Hugging Face's
`GPT2LMHeadModel`, and our GPT with its earlier, unfused LM head + loss."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPT, GPTConfig, NextTokenLoss


class NaiveBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        C, hd = c.n_embd, c.head_dim
        self.n_head, self.n_kv_groups, self.hd = c.n_head, c.n_kv_groups, hd
        self.ln1_w, self.ln1_b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.ln2_w, self.ln2_b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, c.n_kv_groups * hd), nn.Linear(C, c.n_kv_groups * hd)
        self.proj, self.fc, self.fc_out = nn.Linear(C, C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.register_buffer("mask", torch.tril(torch.ones(c.block_size, c.block_size)), persistent=False)

    @staticmethod
    def layer_norm(x, w, b, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    @staticmethod
    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    def forward(self, x):
        B, T, C = x.shape
        h = self.layer_norm(x, self.ln1_w, self.ln1_b)
        q = self.q(h).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(h).view(B, T, self.n_kv_groups, self.hd).transpose(1, 2)  # (B, G, T, hd)
        v = self.v(h).view(B, T, self.n_kv_groups, self.hd).transpose(1, 2)
        k = k.repeat_interleave(self.n_head // self.n_kv_groups, dim=1)  # (B, nh, T, hd): copies
        v = v.repeat_interleave(self.n_head // self.n_kv_groups, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        att = att.masked_fill(self.mask[:T, :T] == 0, float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(self.gelu(self.fc(self.layer_norm(x, self.ln2_w, self.ln2_b))))


class NaiveGPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.padded_vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(NaiveBlock(c) for _ in range(c.n_layer))
        self.lnf_w, self.lnf_b = nn.Parameter(torch.ones(c.n_embd)), nn.Parameter(torch.zeros(c.n_embd))
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = NaiveBlock.layer_norm(x, self.lnf_w, self.lnf_b) @ self.wte.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_gpt2(config: GPTConfig, device):
    try:
        import transformers
    except ImportError:
        raise UserError("bench.hf=true needs transformers: pip install -e '.[dev]' (or bench.hf=false)") from None
    hf_config = transformers.GPT2Config(
        vocab_size=config.padded_vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf_config).to(device)
    assert model.config._attn_implementation == "sdpa"
    return model


class UnfusedHeadGPT(GPT):
    """Our GPT with the LM head and loss as they were before the fused, chunked `lm_head_loss`: the full
    (B*T, V_padded) logits, then `NextTokenLoss` (the bench's before/after contender for speed and memory)."""

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, V_padded)
        if targets is None:
            return logits[..., : self.config.vocab_size]
        return NextTokenLoss.apply(logits.flatten(0, 1), targets.flatten(), self.config.vocab_size)
