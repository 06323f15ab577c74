"""The LightningModule: next-token loss, val/test metrics, and the optimizer + schedule from the model layer."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.model.optim import cosine_with_warmup, make_optimizer


class GPTLightningModule(L.LightningModule):
    """Wraps a plain `GPT`. `save_hyperparameters` stores everything needed to rebuild it from a checkpoint alone."""

    def __init__(self, model: dict, optim: dict, compile: bool = False, encoding: str = "gpt2"):
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
        self.flops_per_batch = None  # read by Lightning's ThroughputMonitor (FLOPs and MFU curves)

    @classmethod
    def from_config(cls, config: GPTConfig, optim: dict, **kwargs) -> "GPTLightningModule":
        return cls(model=asdict(config), optim=dict(optim), **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) each
        if self.flops_per_batch is None:
            self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()
        loss = self.model(x, y)
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # mean over ranks
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_loss.update(self.model(x, y), weight=x.size(0))  # per window, also for a short last batch

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_loss.update(self.model(x, y), weight=x.size(0))

    def on_test_epoch_end(self):
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict({"test/loss": loss, "test/ppl": torch.exp(loss)})

    def configure_optimizers(self):
        o = self.hparams.optim
        device_type = next(self.model.parameters()).device.type
        # Fused AdamW kernels exist for CUDA and CPU; not with fp16's GradScaler, whose unscaling Lightning
        # must do before clipping (a fused optimizer would unscale only inside its own step).
        fused = device_type in ("cuda", "cpu") and str(self.trainer.precision) not in ("16-mixed", "16", "16-true")
        optimizer = make_optimizer(self.model, o, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        min_ratio = o["min_lr"] / o["lr"]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, o["warmup_steps"], total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """trainer.gradient_clip_val, applied here because Lightning's AMP plugin refuses to clip for a fused
        optimizer even under bf16, where there is no loss scaling to undo. (fp16 keeps the unfused optimizer
        and Lightning's own path, which unscales first.)"""
        if not gradient_clip_val:
            return
        if getattr(optimizer, "defaults", {}).get("fused") and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
