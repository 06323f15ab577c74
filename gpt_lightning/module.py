"""The LightningModule: next-token loss, metrics, AdamW with decay groups, warmup + cosine schedule."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from gpt_lightning.model import GPT, GPTConfig


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


class GPTLightningModule(L.LightningModule):
    """Wraps a plain `GPT`. `save_hyperparameters` stores everything needed to rebuild it from a checkpoint alone."""

    def __init__(self, model: dict, optim: dict, compile: bool = False, encoding: str = "gpt2",
                 attention_type: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = GPTConfig(**model)
        self.model = GPT(self.config)
        if compile:
            # In-place Module.compile: the state-dict keys stay those of the plain GPT (no `_orig_mod.`).
            self.model.compile()
        self.val_loss = MeanMetric()  # torchmetrics reduces across DDP ranks
        self.test_loss = MeanMetric()
        self.tokens_seen = 0  # restored from checkpoints, so resumed curves continue
        self.train_seconds = 0.0  # wall time inside training batches of this process (no validation)
        self.train_tokens = 0  # tokens this process trained on since it started
        self.flops_per_batch = None  # read by Lightning's ThroughputMonitor (FLOPs and MFU curves)

    @classmethod
    def from_config(cls, config: GPTConfig, optim: dict, **kwargs) -> "GPTLightningModule":
        return cls(model=asdict(config), optim=dict(optim), **kwargs)

    def on_train_batch_start(self, batch, batch_idx):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._batch_start

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) each
        if self.flops_per_batch is None:
            self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()
        self.train_tokens += x.numel() * self.trainer.world_size
        loss = self.model(x, y)
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_loss.update(self.model(x, y))

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_loss.update(self.model(x, y))

    def on_test_epoch_end(self):
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict({"test/loss": loss, "test/ppl": torch.exp(loss)})

    def configure_optimizers(self):
        o = self.hparams.optim
        # Decay matrices (linear weights, embeddings); never biases or LayerNorm gains.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        device_type = next(self.model.parameters()).device.type
        fused = device_type in ("cuda", "cpu")  # fused AdamW kernels exist for both in torch >= 2.4
        optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        min_ratio = o["min_lr"] / o["lr"]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, o["warmup_steps"], total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
