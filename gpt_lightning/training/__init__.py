"""The Lightning + Hydra glue: module.py (LightningModule), callbacks.py, model_config.py (Hydra config -> GPTConfig),
run_dirs.py (run directories, DDP under Hydra), checkpoints.py, run_record.py (what a run reports), hparams.py;
schema.py (the config's types), config_checks.py (ranges and agreements), config_errors.py (one-line Hydra errors),
memory_check.py, checkpoint_io.py (atomic checkpoints), signals.py (SIGTERM/SIGINT), sweep.py (multirun guard)."""
