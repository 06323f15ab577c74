"""The Lightning + Hydra glue: module.py (LightningModule), callbacks.py, model_config.py (Hydra config -> GPTConfig),
run_dirs.py (run directories, DDP under Hydra), checkpoints.py, run_record.py (what a run reports), hparams.py."""
