"""From the composed Hydra config to a validated `GPTConfig`, and the config resolvers the run directories use.

`attention=mha|gqa|mqa` picks a preset; the preset's `type` must agree with its counts (mha: kv_groups = n_heads;
mqa: kv_groups = 1; gqa: any divisor, so a gqa sweep can span MQA..MHA). What a run is *called* never comes from
`type`: it is `attention_label(n_heads, kv_groups)`, derived from the counts (folder names, records, HPARAMS).
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPTConfig, attention_label
from gpt_lightning.training import schema  # noqa: F401  (registers the config schemas with Hydra's ConfigStore)

ATTENTION_TYPES = ("mha", "gqa", "mqa")


def _label_resolver(n_heads, kv_groups) -> str:
    try:
        return attention_label(int(n_heads), int(kv_groups))
    except (TypeError, ValueError):  # a bad value: the folder name says so, the config check names it
        return "invalid"


def register_resolvers() -> None:
    """`${attention_label:${attention.n_heads},${attention.kv_groups}}` and `${pid:}` (run directories: two runs
    started in the same second by two processes never share a directory)."""
    OmegaConf.register_new_resolver("attention_label", _label_resolver, replace=True)
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True, replace=True)


register_resolvers()  # at import: Hydra resolves hydra.run.dir / sweep.subdir after composing


def check_attention(type: str, n_heads: int, kv_groups: int) -> None:
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
