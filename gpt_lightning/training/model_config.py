"""From the composed Hydra config to a validated `GPTConfig`, and the config resolvers the run directories use.

`attention=mha|gqa|mqa` picks a preset; the preset's `type` must agree with its counts (mha: kv_groups = n_heads;
mqa: kv_groups = 1; gqa: any divisor, so a gqa sweep can span MQA..MHA). What a run is *called* never comes from
`type`: it is `attention_label(n_heads, kv_groups)`, derived from the counts (folder names, records, HPARAMS).
"""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPTConfig, attention_label
from gpt_lightning.training import schema  # noqa: F401  (registers the config schemas with Hydra's ConfigStore)

log = logging.getLogger(__name__)

ATTENTION_TYPES = ("mha", "gqa", "mqa")
MATCH_TOLERANCE = 0.005  # matched parameter counts agree with MHA's to 0.5% (of the non-embedding count)


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


def block_params(n_embd: int, n_head: int, n_kv_groups: int, hidden: int, bias: bool) -> int:
    """Parameters of one transformer block (attention + MLP + 2 LayerNorms): what `match_params` balances."""
    C, hd, b = n_embd, n_embd // n_head, int(bias)
    qkv = C + 2 * n_kv_groups * hd
    attention = C * qkv + b * qkv + C * C + b * C
    mlp = C * hidden + b * hidden + hidden * C + b * C
    return attention + mlp + 2 * (C + b * C)


def matched_mlp_hidden(n_embd: int, n_head: int, n_kv_groups: int, bias: bool = True) -> int:
    """The MLP width that gives a GQA/MQA block MHA's parameter count at the same shape (Llama 2, §A.2.1).

    Fewer KV heads save 2 (n_head - G) hd (C + bias) attention parameters per block; each MLP unit costs 2C + bias,
    so the MLP grows by about (n_head - G) hd units. A multiple of 8 (friendlier matmuls) is taken when it keeps
    the block within 0.5% of MHA's, else the nearest integer (tiny shapes, where 8 units are more than 0.5%).
    """
    mha = block_params(n_embd, n_head, n_head, 4 * n_embd, bias)
    saved = mha - block_params(n_embd, n_head, n_kv_groups, 4 * n_embd, bias)
    exact = 4 * n_embd + saved / (2 * n_embd + int(bias))
    rounded = max(8, round(exact / 8) * 8)
    if abs(block_params(n_embd, n_head, n_kv_groups, rounded, bias) - mha) <= MATCH_TOLERANCE * mha:
        return rounded
    return round(exact)


def gpt_config_from_cfg(cfg, vocab_size: int) -> GPTConfig:
    """Model shape from the `model` and `attention` groups; the vocabulary from the tokenizer.

    `model.match_params=true` widens a GQA/MQA model's MLP to MHA's parameter count (a no-op on MHA, logged).
    """
    att = cfg.attention
    check_attention(att.type, att.n_heads, att.kv_groups)
    mlp_hidden = None
    if cfg.model.get("match_params", False):
        if att.kv_groups == att.n_heads:
            log.info("model.match_params=true on an MHA model (kv_groups = n_heads = %d): nothing to match, "
                     "the MLP stays 4 * n_embd = %d", att.n_heads, 4 * cfg.model.n_embd)
        elif cfg.model.n_embd % att.n_heads == 0:  # else GPTConfig names the bad shape below
            mlp_hidden = matched_mlp_hidden(cfg.model.n_embd, att.n_heads, att.kv_groups, bool(cfg.model.bias))
            log.info("model.match_params=true: MLP widened from %d to %d so that %d KV heads give MHA's parameter "
                     "count", 4 * cfg.model.n_embd, mlp_hidden, att.kv_groups)
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=cfg.model.block_size,
        n_layer=cfg.model.n_layer,
        n_head=att.n_heads,
        n_kv_groups=att.kv_groups,
        n_embd=cfg.model.n_embd,
        dropout=float(cfg.model.dropout),
        bias=bool(cfg.model.bias),
        mlp_hidden=mlp_hidden,
    )
