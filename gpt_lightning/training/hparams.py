"""Hyperparameters and final metrics in every logger: TensorBoard's HPARAMS tab, the CSV logger's hparams.yaml and
metrics.csv, the W&B run config and history. Declared at the start, the final metrics logged at the end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from gpt_lightning.model import GPTConfig
from gpt_lightning.training.run_record import RunRecord

HPARAM_METRICS = ("hp/best_val_loss", "hp/test_ppl", "hp/train_tokens_per_sec", "hp/decode_tokens_per_sec")


def hparams(config: GPTConfig, lr: float) -> dict:
    return {"attention": config.attention, "n_head": config.n_head, "kv_groups": config.n_kv_groups,
            "n_layer": config.n_layer, "n_embd": config.n_embd, "block_size": config.block_size, "lr": lr}


def log_hparams_start(trainer: L.Trainer, config: GPTConfig, lr: float) -> None:
    params = hparams(config, lr)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab needs the metric names up front (NaN placeholders)
            logger.log_hyperparams(params, metrics={m: float("nan") for m in HPARAM_METRICS})
        else:
            logger.log_hyperparams(params)


def log_hparams_end(trainer: L.Trainer, record: RunRecord) -> None:
    hp = {"hp/best_val_loss": record.best_val_loss, "hp/test_ppl": record.test_ppl,
          "hp/train_tokens_per_sec": record.train_tokens_per_sec,
          "hp/decode_tokens_per_sec": record.decode_tokens_per_sec}
    for logger in trainer.loggers:
        logger.log_metrics({k: v for k, v in hp.items() if v is not None}, step=trainer.global_step)
        logger.save()
