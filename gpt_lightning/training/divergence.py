"""Stop a run whose loss is NaN or infinite at once, with one line, and record it as failed.

A diverged run would otherwise spend the rest of its steps (and a test pass) on NaNs. Inside a sweep the job returns
NaN, which the sweeper records as a failed trial before it goes on with the next one; a single run exits with
status 3. Configured as `callbacks.divergence` (remove with `~callbacks.divergence`).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import lightning as L
import torch

from gpt_lightning.training.run_record import TRAIN_RECORD, RunRecord

log = logging.getLogger(__name__)
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to change."""


class DivergenceGuard(L.Callback):
    """After every `every_n_steps` training steps (and every validation), check the loss is finite on all ranks."""

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = max(1, int(every_n_steps))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._check(trainer, pl_module, "train/loss", loss.detach())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None:
            self._check(trainer, pl_module, "val/loss", loss)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, loss: torch.Tensor) -> None:
        # every rank decides together, so no rank is left waiting in a collective for one that stopped
        if trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss).all()), all=True):
            return
        lr = (pl_module.hparams.get("optim") or {}).get("lr")
        message = (f"training diverged: {name}={float(loss)} at step {trainer.global_step} (optim.lr={lr}); run "
                   f"stopped. Lower optim.lr or raise optim.warmup_steps")
        if trainer.is_global_zero:
            model = getattr(pl_module, "model", None)
            if model is not None:
                RunRecord.for_model("train", model, status="failed", error=message,
                                    encoding=pl_module.hparams.get("encoding"), global_step=trainer.global_step,
                                    tokens_seen=getattr(pl_module, "tokens_seen", None)
                                    ).save(Path(trainer.default_root_dir) / TRAIN_RECORD)
        raise TrainingDiverged(message)


def stop_diverged(error: TrainingDiverged, multirun: bool) -> float:
    """The entry point's answer to a diverged run: one error line (console and train.log); NaN for a sweeper to
    record as a failed trial, or exit status 3 for a single run."""
    log.error("%s", error)
    if not multirun:
        sys.exit(EXIT_DIVERGED)
    return math.nan
