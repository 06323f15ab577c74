"""The end-of-run summary: `<run>/summary.json` and TensorBoard's HPARAMS entry, read later by `compare`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gpt_lightning.kv_cache import kv_cache_bytes_per_token
from gpt_lightning.measure import decode_tokens_per_sec

HPARAM_METRICS = ("hp/best_val_loss", "hp/test_ppl", "hp/train_tokens_per_sec", "hp/decode_tokens_per_sec")


def log_hparams_start(trainer: L.Trainer, module, attention_type: str) -> None:
    """Declare the sweep's hyperparameters and metrics for TensorBoard's HPARAMS tab; values come at the end."""
    c = module.config
    params = {"attention": attention_type, "n_head": c.n_head, "kv_groups": c.n_kv_groups, "n_layer": c.n_layer,
              "n_embd": c.n_embd, "block_size": c.block_size, "lr": module.hparams.optim.get("lr")}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics={m: float("nan") for m in HPARAM_METRICS})


def write_summary(trainer: L.Trainer, module, run_dir: Path, metrics: dict, best_val_loss: float | None,
                  decode_prompt: torch.Tensor | None) -> dict:
    """Rank 0: final metrics, model size, KV bytes, measured speeds -> summary.json and the hp/ scalars."""
    c = module.config
    model = module.model
    decode = None
    if decode_prompt is not None:
        decode = decode_tokens_per_sec(model, decode_prompt[None].to(module.device), new_tokens=32, repeats=2)
    summary = {
        "status": "complete",
        "attention_type": module.hparams.attention_type,
        "n_head": c.n_head, "kv_groups": c.n_kv_groups, "n_layer": c.n_layer, "n_embd": c.n_embd,
        "block_size": c.block_size, "encoding": module.hparams.encoding,
        "parameters": model.num_params(non_embedding=False),
        "global_step": trainer.global_step, "tokens_seen": module.tokens_seen,
        "best_val_loss": best_val_loss,
        **{k.replace("/", "_"): v for k, v in sorted(metrics.items()) if k.split("/")[0] in ("val", "test", "train")},
        "train_tokens_per_sec": module.train_tokens / module.train_seconds if module.train_seconds else None,
        "decode_tokens_per_sec": decode,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(c.n_layer, c.n_kv_groups, c.head_dim),
        "kv_cache_bytes_per_token_mha": kv_cache_bytes_per_token(c.n_layer, c.n_head, c.head_dim),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    hp = {"hp/best_val_loss": best_val_loss, "hp/test_ppl": metrics.get("test/ppl"),
          "hp/train_tokens_per_sec": summary["train_tokens_per_sec"], "hp/decode_tokens_per_sec": decode}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_metrics({k: v for k, v in hp.items() if v is not None}, step=trainer.global_step)
            logger.save()
    return summary
