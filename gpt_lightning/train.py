"""`python -m gpt_lightning.train [overrides]`: compose the config, build the objects, let Lightning train and test."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, instantiate
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.callbacks import GenerationCallback
from gpt_lightning.config import gpt_config_from_cfg
from gpt_lightning.convert import init_state_from
from gpt_lightning.errors import UserError
from gpt_lightning.module import GPTLightningModule
from gpt_lightning.run_dirs import resolve_ckpt_path
from gpt_lightning.summary import log_hparams_start, write_summary

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Train, test on the test split, return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    launch_dir = Path(get_original_cwd())
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, launch_dir / "outputs")

    datamodule = instantiate(cfg.data, _convert_="all")  # plain lists: checkpoints load with weights_only
    gpt_config = gpt_config_from_cfg(cfg, datamodule.vocab_size)
    module = GPTLightningModule.from_config(
        gpt_config, OmegaConf.to_container(cfg.optim, resolve=True), compile=cfg.model.compile,
        encoding=cfg.data.encoding, attention_type=cfg.attention.type)
    if cfg.init_from:  # weights only: a checkpoint (KV heads pooled if it has more) or hf:FOLDER
        module.model.load_state_dict(init_state_from(cfg.init_from, gpt_config, cfg.data.encoding))

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks.append(GenerationCallback(**cfg.generation))
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=callbacks,
                        logger=loggers, default_root_dir=run_dir)
    log.info("model: %s, %.2fM parameters, attention=%s (%d heads, %d KV heads)", gpt_config.__class__.__name__,
             module.model.num_params() / 1e6, cfg.attention.type, gpt_config.n_head, gpt_config.n_kv_groups)

    log_hparams_start(trainer, module, cfg.attention.type)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # val/* of the last validation
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    best_val = float(checkpoint.best_model_score) if checkpoint is not None and checkpoint.best_model_score is not None else None
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None)

    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if trainer.is_global_zero:
        prompt = datamodule.datasets["val"][0][0][:16] if len(datamodule.datasets.get("val", [])) else None
        write_summary(trainer, module, run_dir, metrics, best_val, prompt)
        log.info("checkpoints: %s", checkpoint.dirpath if checkpoint is not None else "(none)")
        log.info("best: %s", best or "(none)")
        log.info("TensorBoard: tensorboard --logdir %s", run_dir)
        log.info("final metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/loss")  # what a Hydra sweeper would minimise


if __name__ == "__main__":
    main()
