"""The LightningModule: next-token loss, val/test metrics (loss, perplexity, bits per byte), and the optimizer +
schedule from the model layer.

Bits per byte (bpb) = summed next-token loss in nats over the target tokens / (ln 2 x the UTF-8 bytes those targets
decode to). Unlike loss per token it does not depend on the tokenizer, so gpt2, o200k_base and byte-level runs share
one axis. <|endoftext|> counts 0 bytes. Validation reports it over the evaluated batches (limit_val_batches), test
over every window of the test split.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
from torchmetrics.aggregation import MeanMetric, SumMetric

from gpt_lightning.data.tokens import token_byte_lengths

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
        # Bits per byte: summed nats and summed target bytes, divided at the end (torchmetrics sums across ranks).
        self.register_buffer("token_bytes", torch.from_numpy(token_byte_lengths(encoding)), persistent=False)
        self.val_nats, self.val_bytes = SumMetric(), SumMetric()
        self.test_nats, self.test_bytes = SumMetric(), SumMetric()
        self.tokens_seen = 0  # restored from checkpoints, so resumed curves continue
        self.flops_per_batch = None  # read by Lightning's ThroughputMonitor (FLOPs and MFU curves)
        self._resumed_rng: dict | None = None  # a resumed checkpoint's RNG states, applied at on_train_start

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

    def _evaluate(self, batch, loss_metric, nats, bytes_):
        x, y = batch
        loss = self.model(x, y)  # mean over the B*T targets
        loss_metric.update(loss, weight=x.size(0))  # per window, also for a short last batch
        nats.update(loss.float() * y.numel())
        bytes_.update(self.token_bytes[y].sum())

    def _log_evaluation(self, stage, loss_metric, nats, bytes_, **kwargs):
        loss = loss_metric.compute()
        bpb = nats.compute() / (math.log(2) * bytes_.compute())
        for metric in (loss_metric, nats, bytes_):
            metric.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/ppl": torch.exp(loss), f"{stage}/bpb": bpb}, **kwargs)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_loss, self.val_nats, self.val_bytes)

    def on_validation_epoch_end(self):
        self._log_evaluation("val", self.val_loss, self.val_nats, self.val_bytes, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_loss, self.test_nats, self.test_bytes)

    def on_test_epoch_end(self):
        self._log_evaluation("test", self.test_loss, self.test_nats, self.test_bytes)

    def configure_optimizers(self):
        o = self.hparams.optim
        device_type = next(self.model.parameters()).device.type
        # Fused AdamW kernels exist for CUDA and CPU; not with fp16's GradScaler, whose unscaling Lightning
        # must do before clipping (a fused optimizer would unscale only inside its own step).
        fused = device_type in ("cuda", "cpu") and str(self.trainer.precision) not in ("16-mixed", "16", "16-true")
        optimizer = make_optimizer(self.model, o, fused=fused)
        min_ratio = o["min_lr"] / o["lr"]
        total: list[int] = []

        def factor(step: int) -> float:
            # The schedule's length is asked for at the first step, not here: with trainer.max_epochs set,
            # estimated_stepping_batches builds the train loader, and here (strategy setup) comes before Lightning
            # restores a resumed run's loop progress: that loader would start the epoch from its first batch.
            # At step 0 (LambdaLR calls this once on construction) the factor does not depend on the length.
            if step == 0:
                return cosine_with_warmup(0, o["warmup_steps"], 1, min_ratio)
            if not total:
                total.append(int(self.trainer.estimated_stepping_batches))
            return cosine_with_warmup(step, o["warmup_steps"], total[0], min_ratio)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
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
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self._resumed_rng = checkpoint.get("rng_states")

    def on_train_start(self):
        """A resumed run draws the random numbers (dropout) the interrupted run would have drawn next. Restored
        here, not at load: between loading and the first step Lightning creates the train loader's iterator,
        which takes a draw from torch's generator that the original run took before its first step."""
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None


def rng_states() -> dict:
    """torch (CPU, and this process's CUDA device), numpy and Python RNG states, as types a weights_only load reads.

    Under DDP only rank 0 writes checkpoints, and every rank restores rank 0's states. That is exact: every rank is
    seeded with the same `seed` (seed_everything) and draws the same random numbers per step (same model, same
    batch shape), so the ranks' states are equal throughout."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])  # the current device: this rank's
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
