"""Loggers: `logger=csv`, `logger=wandb`, several at once; hyperparameters in each; compare from CSV-only runs."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import TRAIN_ENV, train_command
from conftest import run_train as train
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger

from gpt_lightning.analysis.report import compare
from gpt_lightning.analysis.runs import read_csv_scalars, read_curves, read_run
from gpt_lightning.common.errors import UserError
from gpt_lightning.model import GPTConfig
from gpt_lightning.training.hparams import log_hparams_end, log_hparams_start
from gpt_lightning.training.loggers import build_loggers
from gpt_lightning.training.run_record import RunRecord

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_several_loggers_are_selected_at_once():
    assert sorted(cfg("logger=[tensorboard,csv]").logger) == ["csv", "tensorboard"]
    assert sorted(cfg("logger=csv").logger) == ["csv"]
    assert cfg("logger=wandb").logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"


def test_wandb_without_the_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r'logger=wandb needs the wandb package, which is not installed: '
                                        r'pip install -e "\.\[wandb\]"'):
        build_loggers(cfg("logger=wandb").logger)


def csv_run(run: Path, steps: int = 3, kv_groups: int = 2) -> CSVLogger:
    """A run directory whose only log is the CSV logger's, as `logger=csv` leaves it."""
    logger = CSVLogger(save_dir=run, name="csv", version="")
    for step in range(steps):
        logger.log_metrics({"train/loss": 5.0 - step}, step=step)
        logger.log_metrics({"val/loss": 4.0 - step / 2, "val/ppl": 2.0}, step=step)
    logger.save()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"attention: {{n_heads: 4, kv_groups: {kv_groups}}}\n"
                                                "model: {n_layer: 1, n_embd: 16}\n")
    return logger


def test_hparams_and_final_metrics_reach_a_csv_logger(tmp_path):
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="")
    trainer = SimpleNamespace(loggers=[logger], global_step=7)
    config = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=4, n_kv_groups=2, n_embd=16)
    log_hparams_start(trainer, config, lr=3e-4)
    log_hparams_end(trainer, RunRecord(kind="train", best_val_loss=2.5, test_ppl=12.0))
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["kv_groups"] == 2 and hparams["attention"] == "gqa" and hparams["lr"] == 3e-4
    scalars, source = read_curves(tmp_path)
    assert source == "csv" and scalars["hp/best_val_loss"] == [(7, 2.5)]


def test_curves_come_from_csv_when_there_are_no_tensorboard_events(tmp_path):
    csv_run(tmp_path / "run")
    row = read_run(tmp_path / "run", tmp_path)
    assert row["curves"] == "csv"
    assert row["val_curve"] == [(0, 4.0), (1, 3.5), (2, 3.0)]


def test_compare_says_which_runs_have_no_tensorboard_events(tmp_path):
    csv_run(tmp_path / "a", kv_groups=4)  # MHA: compare's default baseline
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"kind": "train", "version": 1}))
    compare(tmp_path)
    report = (tmp_path / "comparison.md").read_text()
    assert "No TensorBoard events in a: their curves come from csv/metrics.csv." in report
    assert "No TensorBoard events and no csv/metrics.csv in b: no curves." in report


# --- end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_and_csv_together(corpus, tmp_path):
    result = train(corpus, tmp_path, "hydra.run.dir=run", "logger=[tensorboard,csv]")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert any((run / "tb").glob("events.out.tfevents.*"))
    scalars, source = read_curves(run)
    assert source == "tensorboard"  # TensorBoard first when a run has both
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["kv_groups"] == 2 and hparams["n_head"] == 4
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "test/loss", "hp/best_val_loss"} <= set(header)
    csv_curve = read_csv_scalars(run)["val/loss"]  # the same curve in both loggers
    assert [s for s, _ in csv_curve] == [s for s, _ in scalars["val/loss"]]
    assert [v for _, v in csv_curve] == pytest.approx([v for _, v in scalars["val/loss"]], rel=1e-6)


@pytest.mark.slow
def test_a_csv_only_run_is_compared_from_its_csv(corpus, tmp_path):
    result = train(corpus, tmp_path, "hydra.run.dir=runs/only_csv", "logger=csv", "attention=mha")  # the baseline
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "runs" / "only_csv" / "tb").exists()
    rows = compare(tmp_path / "runs").rows
    assert rows[0]["curves"] == "csv" and len(rows[0]["val_curve"]) == 2  # validations at steps 10 and 20
    assert rows[0]["status"] == "complete" and rows[0]["best_val_loss"] is not None
    assert "No TensorBoard events in only_csv" in (tmp_path / "runs" / "comparison.md").read_text()


@pytest.mark.slow
def test_wandb_offline_logs_inside_the_run_directory(corpus, tmp_path):
    pytest.importorskip("wandb", reason='W&B is an optional extra: pip install -e ".[wandb]"')
    env = {**TRAIN_ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true",  # no account, no network
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}
    result = subprocess.run(train_command(corpus, "hydra.run.dir=run", "logger=wandb"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run's record file (protobuf, uploaded by `wandb sync`) holds the config and the final hp/ metrics.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert all(key in record for key in (b"kv_groups", b"attention", b"val/loss", b"hp/best_val_loss"))
