"""Pins the few Lightning internals we use where no public API exists. A Lightning upgrade that moves them fails
here, loudly, naming the place to fix, instead of silently breaking MFU on CPUs or mid-epoch resume."""

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from gpt_lightning.training.callbacks import MFUThroughputMonitor, compute_dtype


class Recorder(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        loop = trainer.fit_loop  # used by gpt_lightning/data/datamodule.py to resume mid-epoch
        self.seen = (loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.ready)


def fit(callbacks, tmp, steps=6):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=L.pytorch.loggers.CSVLogger(tmp),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=callbacks, limit_val_batches=0)
    model = BoringModel()
    model.flops_per_batch = 1e6  # ThroughputMonitor reads it for FLOPs/s and MFU
    trainer.fit(model)
    return trainer


def test_fit_loop_progress_counters_used_to_resume_mid_epoch(tmp_path):
    recorder = Recorder()
    fit([recorder], tmp_path, steps=4)
    epoch, ready = recorder.seen  # at the start of the 4th batch of the first epoch
    assert (epoch, ready) == (0, 4), "Lightning moved fit_loop.epoch_progress / epoch_loop.batch_progress"


def test_throughput_monitor_keeps_its_throughputs_where_mfu_setup_patches_them(tmp_path):
    monitor = MFUThroughputMonitor(batch_size_fn=lambda b: b.size(0), length_fn=lambda b: b.numel(), window_size=2)
    trainer = fit([monitor], tmp_path)
    assert monitor.available_flops and monitor.available_flops > 0
    assert monitor._throughputs, "Lightning renamed ThroughputMonitor._throughputs"
    assert all(t.available_flops == monitor.available_flops for t in monitor._throughputs.values())
    assert {"train/device/items_per_sec", "train/device/mfu"} <= set(trainer.logged_metrics)


def test_compute_dtype_follows_the_public_precision_string():
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and compute_dtype("16-mixed") is torch.float16
    assert compute_dtype("32-true") is torch.float32


def test_last_checkpoint_holds_the_final_step_when_training_ends_between_validations(tmp_path):
    """max_steps=7 with validation every 5 steps: stock ModelCheckpoint's last.ckpt stays at step 5."""
    from gpt_lightning.training.callbacks import RunCheckpoint

    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", monitor="valid_loss", save_last=True, save_top_k=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=7, val_check_interval=5, limit_val_batches=2,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint])

    class Model(BoringModel):
        def validation_step(self, batch, batch_idx):
            self.log("valid_loss", self.step(batch))

    trainer.fit(Model())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert [p.name for p in (tmp_path / "ckpt").glob("epoch=*")] == ["epoch=0-step=5.ckpt"]  # best stays at val
