"""`python -m gpt_lightning.train [overrides]`: compose the config, build the objects, let Lightning train and test."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import keep_freed_memory, resolve_precision, uses_cuda
from gpt_lightning.common.errors import UserError
from gpt_lightning.measure.memory import peak_memory
from gpt_lightning.measure.timing import end_of_run_decode
from gpt_lightning.training.checkpoints import init_state_from, load_checkpoint
from gpt_lightning.training.divergence import TrainingDiverged, stop_diverged
from gpt_lightning.training.hparams import log_hparams_end, log_hparams_start
from gpt_lightning.training.loggers import build_loggers
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.module import GPTLightningModule
from gpt_lightning.training.run_dirs import one_ddp_job, pin_ddp_children_to_this_job, resolve_ckpt_path
from gpt_lightning.training.run_record import TRAIN_RECORD, RunRecord
from gpt_lightning.training import uptrain
from gpt_lightning.training.search import check_hparams_search, run_objective

log = logging.getLogger(__name__)


def check_schedule(trainer_args: dict) -> None:
    """The cosine schedule spans the run, so the run needs an end."""
    if (trainer_args.get("max_steps") or -1) < 0 and (trainer_args.get("max_epochs") or -1) < 0:
        raise UserError("trainer.max_steps=-1 with trainer.max_epochs=-1 never ends, and the learning-rate schedule "
                        "spans the run: set trainer.max_steps (e.g. 3000) or trainer.max_epochs")


def check_devices(trainer_args: dict) -> None:
    """Refuse device requests this machine cannot meet before anything starts, naming the value."""
    accelerator, devices = str(trainer_args.get("accelerator", "auto")), trainer_args.get("devices", 1)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; "
                        f"use trainer.accelerator=cpu (or auto)")
    if isinstance(devices, int) and uses_cuda(accelerator) and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible; "
                        f"use trainer.devices={torch.cuda.device_count()} or trainer.devices=auto")


def check_resume(ckpt_path: str | None, config) -> None:
    """A resume checkpoint must be ours and of this model's shape; refuse otherwise and leave the file alone."""
    if not ckpt_path:
        return
    saved = load_checkpoint(ckpt_path)["hyper_parameters"]["model"]
    differ = [f"{k}={saved.get(k)} (config: {v})" for k, v in asdict(config).items() if saved.get(k) != v]
    if differ:
        raise UserError(f"ckpt_path={ckpt_path} has another model shape: {', '.join(differ)}; resume refused "
                        f"(the checkpoint is untouched): use its settings, or init_from= to start from its weights")


def train_record(trainer: L.Trainer, module: GPTLightningModule, metrics: dict, best_val: float | None,
                 precision: str, logged: dict, details: dict | None = None) -> RunRecord:
    """What this run reports: shape and size, final metrics, ThroughputMonitor's tokens/s and MFU (`logged`: what
    fitting logged, read before `test` resets it), decode speed."""
    # ThroughputMonitor: train/device/* for this process; train/* (all ranks) under DDP.
    tokens_per_sec = logged.get("train/items_per_sec", logged.get("train/device/items_per_sec"))
    device = trainer.strategy.root_device
    peak, peak_kind = peak_memory(device)
    return RunRecord.for_model(
        "train", module.model, encoding=module.hparams.encoding,
        global_step=trainer.global_step, tokens_seen=module.tokens_seen, best_val_loss=best_val,
        val_loss=metrics.get("val/loss"), val_ppl=metrics.get("val/ppl"), val_bpb=metrics.get("val/bpb"),
        test_loss=metrics.get("test/loss"), test_ppl=metrics.get("test/ppl"), test_bpb=metrics.get("test/bpb"),
        train_tokens_per_sec=tokens_per_sec, train_mfu=logged.get("train/device/mfu"),
        decode_tokens_per_sec=end_of_run_decode(module.model),
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, precision=precision,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", details=details or {})


def study_home(run_dir: Path) -> Path:
    """Where `uptrain.parent=train` puts the parent: the sweep directory (shared by its jobs), else the run's."""
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else run_dir


def train(cfg: DictConfig) -> dict:
    """Train, test on the test split with the best checkpoint, write the run record; return the final metrics."""
    keep_freed_memory()
    up = uptrain.check(cfg)  # bad uptrain.* settings: one line, before any work
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    launch_dir = Path(get_original_cwd())
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, launch_dir / "outputs")
    init_from = cfg.init_from
    if up["parent"] == "train":
        init_from = uptrain.train_parent(study_home(run_dir), list(HydraConfig.get().overrides.task), launch_dir)
    plan = uptrain.plan(up, init_from)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    gpt_config = gpt_config_from_cfg(cfg, datamodule.vocab_size)
    check_resume(ckpt_path, gpt_config)
    optim = uptrain.optim_settings(OmegaConf.to_container(cfg.optim, resolve=True), up, plan)
    module = GPTLightningModule.from_config(gpt_config, optim, compile=cfg.model.compile, encoding=cfg.data.encoding)
    if plan.loads_weights:  # weights only: a checkpoint (KV heads pooled if it has more) or hf:FOLDER
        module.model.load_state_dict(init_state_from(init_from, gpt_config, cfg.data.encoding, plan.method))

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = build_loggers(cfg.logger)  # one or several: logger=[tensorboard,csv]
    pin_ddp_children_to_this_job()
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if plan.max_steps is not None:  # a study arm: its steps follow the parent's
        trainer_args["max_steps"] = plan.max_steps
        interval = trainer_args.get("val_check_interval")
        if isinstance(interval, int) and plan.max_steps and interval > plan.max_steps:
            trainer_args["val_check_interval"] = plan.max_steps  # at least one validation, at the end
    check_devices(trainer_args)
    if not plan.evaluate_only:
        check_schedule(trainer_args)
    precision = trainer_args["precision"] = resolve_precision(trainer_args.get("precision", "auto"),
                                                              trainer_args.get("accelerator", "auto"))
    trainer = L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers, default_root_dir=run_dir)
    log.info("model: %.2fM parameters, %d layers x %d (MLP %d), attention=%s (%d heads, %d KV heads), precision %s",
             module.model.num_params(non_embedding=False) / 1e6, gpt_config.n_layer, gpt_config.n_embd,
             gpt_config.hidden, gpt_config.attention, gpt_config.n_head, gpt_config.n_kv_groups, precision)

    log_hparams_start(trainer, gpt_config, optim["lr"])
    checkpoint = trainer.checkpoint_callback
    if plan.evaluate_only:  # alpha = 0: the converted model as is (Lightning cannot fit 0 steps)
        trainer.validate(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best, best_val, fit_logged = "", metrics.get("val/loss"), {}
        if checkpoint is not None:  # so evaluate/generate/init_from work on it (every rank calls; rank 0 writes)
            trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_logged = {k: float(v) for k, v in trainer.logged_metrics.items()}  # test() starts a fresh log
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # val/* of the last validation
        best = checkpoint.best_model_path if checkpoint is not None else ""
        best_val = (float(checkpoint.best_model_score)
                    if checkpoint is not None and checkpoint.best_model_score is not None else None)
        if plan.alpha is not None:  # a study arm is judged on its final weights (the paper's uptrained model)
            interval = trainer_args.get("val_check_interval")
            if not isinstance(interval, int) or trainer.global_step % interval:  # last step not yet validated
                trainer.validate(module, datamodule=datamodule)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            best = ""
            best_val = min((v for v in (best_val, metrics.get("val/loss")) if v is not None), default=None)
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None)

    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if trainer.is_global_zero:
        details = {"uptrain": plan.details()} if plan.alpha is not None else None
        record = train_record(trainer, module, metrics, best_val, precision, fit_logged, details)
        record.save(run_dir / TRAIN_RECORD)
        log_hparams_end(trainer, record)
        log.info("checkpoints: %s", checkpoint.dirpath if checkpoint is not None else "(none)")
        log.info("best: %s", best or "(none)")
        log.info("TensorBoard: tensorboard --logdir %s", run_dir)
        log.info("final metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with exits_on_user_error():
        try:
            with one_ddp_job():
                train(cfg)
        except SIGTERMException:  # preempted: say so to the scheduler (a bare SystemExit would exit 0)
            print("stopped by SIGTERM; resume with ckpt_path=last and this run's hydra.run.dir", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except TrainingDiverged as e:  # NaN/inf loss: one line; a sweep records a failed trial and goes on
            return stop_diverged(e, multirun=HydraConfig.get().mode == RunMode.MULTIRUN)
    # What a Hydra sweeper minimises: best val bpb (else best val loss) from the run record train wrote.
    return run_objective(HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    with exits_on_user_error():
        check_hparams_search(sys.argv[1:])  # one line naming the searches, not Hydra's multi-line listing
    main()
