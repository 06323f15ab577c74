"""Our Lightning callbacks: text samples after each validation, a checkpoint on SIGTERM/SIGINT, ModelCheckpoint
tracking only this run's directory, and Lightning's ThroughputMonitor given the right MFU peak (our dense GPU
table, else a measured peak). Each is configured in conf/callbacks/ (remove one with `~callbacks.NAME`)."""

from __future__ import annotations

import logging
import os
import signal
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt_lightning.common.errors import UserError
from gpt_lightning.data.tokens import encode_prompt
from gpt_lightning.measure.limits import matmul_peak, spec_peak
from gpt_lightning.model.sampling import check_sampling
from gpt_lightning.training.signals import first_signal, stopped_outside_the_loop

log = logging.getLogger(__name__)

# What each Lightning precision computes its matmuls in (public: the `trainer.precision` string).
COMPUTE_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                 "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16,
                 "64-true": torch.float64, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    return COMPUTE_DTYPE.get(str(precision), torch.float32)


class MFUThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor with MFU against the right peak: on a GPU in our dense spec table
    (measure/limits.py DENSE_PEAKS) that figure, not Lightning's (which misses the H200 and lists sparse peaks for
    some cards); on GPUs in neither table and on every CPU, this device's measured dense-matmul rate in the
    training dtype."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device, dtype = trainer.strategy.root_device, compute_dtype(trainer.precision)
        ours = spec_peak(device, dtype) if device.type == "cuda" else None
        with warnings.catch_warnings():
            if ours is not None:  # Lightning would warn "FLOPs not found" for a card our table knows (the H200)
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        if ours is not None:
            self.available_flops = ours
        elif self.available_flops is None:
            # a CPU: 1024^3 keeps setup quick; an unlisted GPU: the default size (a small product times the launch)
            self.available_flops = matmul_peak(device, dtype, n=1024 if device.type == "cpu" else None, repeats=3)
        # Lightning private API (no public setter): the Throughput objects that setup() just built copied
        # Lightning's available_flops. Pinned by tests/test_lightning_internals.py.
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops


def batch_size(batch) -> int:
    """Windows in an (x, y) batch, for Lightning's ThroughputMonitor."""
    return batch[0].size(0)


def batch_tokens(batch) -> int:
    """Tokens in an (x, y) batch: ThroughputMonitor's items/s are then tokens/s."""
    return batch[0].numel()


class GenerationCallback(L.Callback):
    """After each validation, rank 0 continues fixed prompts and logs them (console, TensorBoard `samples`)."""

    def __init__(self, prompts, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, seed: int = 1234):
        check_sampling(temperature, top_k, top_p)  # before training, not after the first validation
        if max_new_tokens < 1:
            raise UserError(f"callbacks.generation.max_new_tokens={max_new_tokens} must be >= 1 "
                            f"(or ~callbacks.generation to turn samples off)")
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed  # same seed every time, so samples differ only because the model changed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.prompts:
            return
        tokenizer = trainer.datamodule.tokenizer
        model = pl_module.model
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        samples = []
        for prompt in self.prompts:
            idx = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)
            out = model.generate(idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                 top_p=self.top_p, generator=generator)
            samples.append((prompt, tokenizer.decode(out[0, idx.size(1):].tolist())))
        step = trainer.global_step
        text = "\n\n".join(f"**{p}**{s}" for p, s in samples)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=step)
        log.info("samples at step %d:\n%s", step, "\n".join(f"  > {p}{s}" for p, s in samples))


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (preemption, `scancel`, `kill`) or SIGINT (Ctrl-C), write `last.ckpt` before the process exits.

    `training/signals.py` turns either signal into Lightning's stop flag, which becomes a SIGTERMException at the
    next step boundary on every rank; this saves the full training state there, so `ckpt_path=last` resumes from
    the step the signal arrived at rather than the last periodic checkpoint. Nothing is saved when the signal
    came outside the training loop (data preparation, restoring, testing): those weights are not this run's
    training state, and a resumed run's last.ckpt must not be overwritten by them.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None or not checkpoint.dirpath:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage not in (RunningStage.TRAINING,
                                                                                 RunningStage.VALIDATING):
            return
        if stopped_outside_the_loop():  # stage is TRAINING from before prepare_data: ask the guard
            return
        path = f"{checkpoint.dirpath}/last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(first_signal() or signal.SIGTERM).name
        log.info("%s: saved %s at step %d; resume with ckpt_path=last", name, path, trainer.global_step)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose best/last tracking belongs to this run's checkpoint directory.

    A checkpoint carries the tracking state of the run that wrote it. Resumed from another directory (the run was
    moved, copied or deleted), stock ModelCheckpoint still reloads `best_model_path`, which points into the old
    run: testing "the best checkpoint" after fit then fails with FileNotFoundError. Here tracking restarts in
    this directory instead; in the same directory, entries whose files are gone are dropped.
    """

    @property
    def state_key(self) -> str:
        # The same key as ModelCheckpoint's, so checkpoints written with either restore into either.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`last.ckpt` holds the final step. Stock ModelCheckpoint writes it after validation only (and at train end
        only when it never wrote one), so a run with max_steps=7 and val_check_interval=5 ended with a step-5
        `last.ckpt`: `ckpt_path=last` then redid steps 6 and 7, and an exported model missed them."""
        # Lightning private API (_should_skip_saving_checkpoint, _save_last_checkpoint, _monitor_candidates);
        # pinned by tests/test_lightning_internals.py.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict) -> None:
        saved_dir = state_dict.get("dirpath")
        if self.dirpath is not None and saved_dir is not None and \
                os.path.realpath(saved_dir) != os.path.realpath(self.dirpath):
            log.info("resuming a checkpoint of another run directory (%s): best/last checkpoint tracking restarts "
                     "in %s", saved_dir, self.dirpath)
            return
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})
        if self.best_model_path and not os.path.isfile(self.best_model_path):
            log.info("the best checkpoint %s is gone; best checkpoint tracking restarts", self.best_model_path)
            self.best_k_models, self.best_model_path, self.best_model_score = {}, "", None
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else -float("inf"))
        if self.last_model_path and not os.path.isfile(self.last_model_path):
            self.last_model_path = ""
