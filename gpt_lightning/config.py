"""From the composed Hydra config to a validated `GPTConfig`: the `attention` group's type must agree with its counts."""

from __future__ import annotations

from gpt_lightning.errors import UserError
from gpt_lightning.model import GPTConfig

ATTENTION_TYPES = ("mha", "gqa", "mqa")


def check_attention(type: str, n_heads: int, kv_groups: int) -> None:
    """mha: kv_groups = n_heads; mqa: kv_groups = 1; gqa: any kv_groups dividing n_heads (1 and n_heads included,
    so a gqa sweep can span MQA..MHA)."""
    if type not in ATTENTION_TYPES:
        raise UserError(f"attention.type={type!r} is unknown; use one of {', '.join(ATTENTION_TYPES)} "
                        f"(e.g. attention=gqa attention.kv_groups=2)")
    for name, value in (("n_heads", n_heads), ("kv_groups", kv_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"attention.{name}={value!r} must be a positive integer")
    if n_heads % kv_groups:
        raise UserError(f"attention.kv_groups={kv_groups} does not divide attention.n_heads={n_heads}; "
                        f"pick a divisor of {n_heads}")
    if type == "mha" and kv_groups != n_heads:
        raise UserError(f"attention=mha needs kv_groups = n_heads, got kv_groups={kv_groups} with n_heads={n_heads}; "
                        f"use attention=gqa attention.kv_groups={kv_groups} for fewer KV heads")
    if type == "mqa" and kv_groups != 1:
        raise UserError(f"attention=mqa needs kv_groups=1, got kv_groups={kv_groups}; "
                        f"use attention=gqa attention.kv_groups={kv_groups} for several KV heads")


def gpt_config_from_cfg(cfg, vocab_size: int) -> GPTConfig:
    """Model shape from the `model` and `attention` groups; the vocabulary from the tokenizer."""
    att = cfg.attention
    check_attention(att.type, att.n_heads, att.kv_groups)
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=cfg.model.block_size,
        n_layer=cfg.model.n_layer,
        n_head=att.n_heads,
        n_kv_groups=att.kv_groups,
        n_embd=cfg.model.n_embd,
        dropout=float(cfg.model.dropout),
        bias=bool(cfg.model.bias),
    )
