"""`python -m gpt_lightning.train [overrides]`: compose the config, build the objects, let Lightning train and test."""

from __future__ import annotations

import logging
import re
import shlex
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_original_cwd, instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import keep_freed_memory, resolve_precision
from gpt_lightning.common.errors import UserError
from gpt_lightning.measure.memory import peak_memory
from gpt_lightning.measure.timing import end_of_run_decode
from gpt_lightning.training import uptrain
from gpt_lightning.training.checkpoint_io import AtomicCheckpointIO, remove_partial_checkpoints
from gpt_lightning.training.checkpoints import init_state_from, load_checkpoint
from gpt_lightning.training.config_checks import check_config
from gpt_lightning.training.config_errors import one_line_config_errors
from gpt_lightning.training.divergence import TrainingDiverged, stop_diverged
from gpt_lightning.training.hparams import log_hparams_end, log_hparams_start
from gpt_lightning.training.loggers import build_loggers
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.module import GPTLightningModule
from gpt_lightning.training.run_dirs import one_ddp_job, pin_ddp_children_to_this_job, resolve_ckpt_path
from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord
from gpt_lightning.training.search import check_hparams_search, run_objective
from gpt_lightning.training.signals import SignalGuard, Stopped

log = logging.getLogger(__name__)


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


def resume_command(run_dir: Path, trained_parent: str | None = None) -> str:
    """The command that continues this run: its own overrides, ckpt_path=last, its directory (a multirun's job
    resumes as a single run). `trained_parent`: the checkpoint of the parent that `uptrain.parent=train` trained
    for this run; the resumed run is told it through the environment, as a sweep's later jobs are, so it reuses
    that parent instead of training a new one in its own directory, and its config (`.hydra/config.yaml`, which
    `compare` groups arms by) stays that of its arm."""
    hc = HydraConfig.get()
    keep = [o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0] not in ("ckpt_path", "hydra.mode")]
    single = ["hydra.mode=RUN"] if hc.mode == RunMode.MULTIRUN else []
    command = shlex.join(["python", "-m", "gpt_lightning.train", *keep, "ckpt_path=last",
                          f"hydra.run.dir={override_value(str(run_dir))}", *single])
    # `env VAR=value python ...`: one argument list, as any shell (or srun, or subprocess) runs it
    return f"env {shlex.quote(f'{uptrain.PARENT_ENV}={trained_parent}')} {command}" if trained_parent else command


def override_value(text: str) -> str:
    """`text` as a Hydra override value: quoted where Hydra's grammar would read it otherwise (`=`, spaces, ...)."""
    if re.fullmatch(r"[A-Za-z0-9_./+\-:@]*", text):  # plain ASCII paths as they are; anything
        # else (accents, `~`, `=`, spaces, quotes) quoted, which Hydra always reads back as the same string
        return text
    return "'" + text.replace("'", "\\'") + "'"


def instantiate_group(name: str, group) -> list:
    """Instantiate each `_target_` entry of the callbacks/logger group; a bad entry is one line naming it."""
    objects = []
    for key, entry in group.items():
        if entry is None:
            continue
        try:
            objects.append(instantiate(entry))
        except InstantiationException as e:
            if isinstance(e.__cause__, UserError):
                raise e.__cause__ from None
            reason = str(e.__cause__ or e).strip().splitlines()[-1]
            raise UserError(f"{name}.{key} ({entry.get('_target_')}) cannot be built: {reason}; "
                            f"check its keys, or drop it with ~{name}.{key}") from None
    return objects


def build_trainer(trainer_args: dict, **objects) -> L.Trainer:
    """lightning.Trainer(**trainer.*, **objects); a value Lightning refuses (one config_checks does not know:
    trainer.limit_val_batches=-1, trainer.strategy=foo, trainer.devices=abc) is one line naming the setting."""
    try:
        return L.Trainer(**trainer_args, **objects)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as e:
        reason = " ".join(str(e).split()).rstrip(".") or type(e).__name__
        named = [f"trainer.{k}={v}" for k, v in trainer_args.items()
                 if re.search(rf"(?<![A-Za-z_]){re.escape(k)}(?![A-Za-z_])", reason, re.IGNORECASE)]
        raise UserError(f"{', '.join(named) or 'the trainer.* settings'}: refused by lightning.Trainer: {reason}; "
                        f"fix that trainer.* value") from None


def study_home(run_dir: Path, resuming: bool = False) -> Path:
    """Where `uptrain.parent=train` puts the parent: the sweep directory (shared by its jobs), else the run's. A
    sweep's job resumed as a single run (`resuming`, no parent of its own) without the resume command's
    GPT_LIGHTNING_UPTRAIN_PARENT still finds its sweep's trained parent beside it, instead of training another."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).resolve()
    beside = run_dir.parent
    if (resuming and not (run_dir / uptrain.PARENT_DIR).exists()
            and uptrain.parent_state(beside / uptrain.PARENT_DIR) == "complete"):
        return beside
    return run_dir


def train(cfg: DictConfig) -> dict:
    """Train, test on the test split with the best checkpoint, write the run record; return the final metrics."""
    up = uptrain.check(cfg)  # bad uptrain.* settings: one line, before any work
    check_config(cfg)  # every range and consistency rule (and the memory a step needs), before any work
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    launch_dir = Path(get_original_cwd())
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, launch_dir / "outputs")
    init_from = cfg.init_from
    if up["parent"] == "train":
        init_from = uptrain.train_parent(study_home(run_dir, resuming=ckpt_path is not None),
                                         list(HydraConfig.get().overrides.task), launch_dir)
    plan = uptrain.plan(up, init_from)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    gpt_config = gpt_config_from_cfg(cfg, datamodule.vocab_size)
    check_resume(ckpt_path, gpt_config)
    optim = uptrain.optim_settings(OmegaConf.to_container(cfg.optim, resolve=True), up, plan)
    module = GPTLightningModule.from_config(gpt_config, optim, compile=cfg.model.compile, encoding=cfg.data.encoding)
    if plan.loads_weights:  # weights only: a checkpoint (KV heads pooled if it has more) or hf:FOLDER
        module.model.load_state_dict(init_state_from(init_from, gpt_config, cfg.data.encoding, plan.method))

    callbacks = instantiate_group("callbacks", cfg.callbacks)
    loggers = build_loggers(cfg.logger)  # one or several: logger=[tensorboard,csv]
    pin_ddp_children_to_this_job()
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if plan.max_steps is not None:  # a study arm: its steps follow the parent's
        trainer_args["max_steps"] = plan.max_steps
        interval = trainer_args.get("val_check_interval")
        if isinstance(interval, int) and plan.max_steps and interval > plan.max_steps:
            trainer_args["val_check_interval"] = plan.max_steps  # at least one validation, at the end
    precision = trainer_args["precision"] = resolve_precision(trainer_args.get("precision", "auto"),
                                                              trainer_args.get("accelerator", "auto"))
    # Checkpoints are written beside their target and renamed over it, wherever $TMPDIR is.
    trainer = build_trainer(trainer_args, callbacks=callbacks, logger=loggers, default_root_dir=run_dir,
                            plugins=[AtomicCheckpointIO()])
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath and rank_zero_only.rank == 0:
        remove_partial_checkpoints(checkpoint.dirpath)  # saves killed mid-write in an earlier process
    log.info("model: %.2fM parameters, %d layers x %d (MLP %d), attention=%s (%d heads, %d KV heads), precision %s",
             module.model.num_params(non_embedding=False) / 1e6, gpt_config.n_layer, gpt_config.n_embd,
             gpt_config.hidden, gpt_config.attention, gpt_config.n_head, gpt_config.n_kv_groups, precision)

    log_hparams_start(trainer, gpt_config, optim["lr"])
    resume = resume_command(run_dir, init_from if up["parent"] == "train" else None)
    with SignalGuard(trainer, checkpoint.dirpath if checkpoint else None, resume) as guard:
        try:
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
        except SIGTERMException:
            signum = guard.first or signal.SIGTERM
            raise Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; "
                                  f"last checkpoint: {guard.last_checkpoint()}; resume with: "
                                  f"{guard.resume_command}") from None

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


def log_to_file(level: int, message: str, exc_info=None) -> None:
    """Into train.log (Hydra's job log file) only: the console gets its own line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord(__name__, level, __file__, 0, message, None, exc_info))
            handler.flush()


def record_failure(run_dir: Path, error: Exception, to_log: bool) -> str:
    """A failed run says so in its run record (compare lists it with the reason) and, with `to_log`, in train.log
    (with the traceback of a crash). A complete record already there (a failed attempt to resume a finished run)
    is kept. Returns the one-line reason."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    if rank_zero_only.rank != 0:
        return message
    if to_log:
        log_to_file(logging.ERROR, f"error: {message}",
                    None if isinstance(error, UserError) else (type(error), error, error.__traceback__))
    path = run_dir / TRAIN_RECORD
    try:
        if path.exists() and RunRecord.load(path).status != "failed":
            return message
    except RecordError:  # unreadable: not ours to replace
        return message
    RunRecord(kind="train", status="failed", error=message).save(path)
    return message


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        with one_ddp_job():
            train(cfg)
    except Stopped as stop:  # a signal: checkpointed at the step boundary (or nothing to save yet)
        log_to_file(logging.INFO, stop.message)
        print(stop.message, file=sys.stderr)
        raise
    except TrainingDiverged as e:  # NaN/inf loss: one line; a sweep records a failed trial and goes on
        return stop_diverged(e, multirun=multirun)
    except Exception as e:  # bad input (UserError) or a crash
        # exits_on_user_error puts a single run's UserError line into train.log itself
        message = record_failure(run_dir, e, to_log=multirun or not isinstance(e, UserError))
        if multirun:  # the sweep goes on; SweepGuard lists the failed jobs at the end
            print(f"error: job {hc.job.num} failed ({run_dir}): {message}", file=sys.stderr)
            return float("nan")
        with exits_on_user_error():  # UserError: one line, exit 2; anything else: its traceback
            raise
    # What a Hydra sweeper minimises: best val bpb (else best val loss) from the run record train wrote.
    return run_objective(run_dir)


if __name__ == "__main__":
    with exits_on_user_error():
        check_hparams_search(sys.argv[1:])  # one line naming the searches, not Hydra's multi-line listing
    main()
