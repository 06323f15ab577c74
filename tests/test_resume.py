"""Resuming in process (a real Trainer, a tiny model, the generated corpus): the resumed run continues with the
batches and the random draws the uninterrupted run would have had."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gpt_lightning.model import GPTConfig
from gpt_lightning.training.module import GPTLightningModule

OPTIM = {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 2, "min_lr": 3e-4}


class Record(L.Callback):
    """The loss of every step and the first windows of every batch, by global step."""

    def __init__(self):
        self.losses, self.batches = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.batches[trainer.global_step] = batch[0][:, 0].tolist()


def fit(dm, ckpt_dir, *, dropout=0.0, ckpt_path=None, **trainer_args):
    """Train a 1-layer GPT on `dm`, saving every 3 steps into ckpt_dir; returns the Record."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_groups=2, n_embd=32,
                       dropout=dropout)
    module = GPTLightningModule.from_config(config, OPTIM, encoding="bytes")
    record = Record()
    saves = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[record, saves], **trainer_args)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record


@pytest.mark.parametrize("limits", [dict(max_steps=6, max_epochs=-1), dict(max_steps=-1, max_epochs=1)],
                         ids=["max_steps", "max_epochs"])
def test_resuming_mid_epoch_continues_with_the_next_batches(fixture_dm, tmp_path, limits):
    """With max_epochs (max_steps=-1) the schedule's step count builds the train loader before the loop progress is
    restored: the data position must still be the checkpoint's."""
    dm = fixture_dm(seed=5)
    dm.prepare_data()
    whole = fit(dm, tmp_path / "a", limit_train_batches=6, **limits)
    resumed = fit(fixture_dm(seed=5), tmp_path / "b", limit_train_batches=6, ckpt_path=tmp_path / "a" / "step=3.ckpt",
                  **limits)
    assert sorted(resumed.batches) == [4, 5, 6]
    assert {s: resumed.batches[s] for s in (4, 5, 6)} == {s: whole.batches[s] for s in (4, 5, 6)}


def test_a_resumed_run_with_dropout_draws_what_the_uninterrupted_run_drew(fixture_dm, tmp_path):
    dm = fixture_dm(seed=5)
    dm.prepare_data()
    whole = fit(dm, tmp_path / "a", dropout=0.1, max_steps=6)
    torch.manual_seed(123)  # whatever this process did before: the checkpoint's RNG state wins
    resumed = fit(fixture_dm(seed=5), tmp_path / "b", dropout=0.1, max_steps=6,
                  ckpt_path=tmp_path / "a" / "step=3.ckpt")
    assert sorted(resumed.losses) == [4, 5, 6]
    assert {s: resumed.losses[s] for s in (4, 5, 6)} == pytest.approx({s: whole.losses[s] for s in (4, 5, 6)},
                                                                      abs=1e-6)

